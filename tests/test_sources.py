"""Prepared sources: loading, random access, compatibility checks, epoch order, segment ids."""

import json
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest
from data_helpers import (
    make_documents,
    make_prepared_source,
    make_sentencepiece,
    reference_segments,
    write_synthetic_source,
)

from cpt_jax.config import ConfigError
from cpt_jax.data.sources import (
    epoch_permutation,
    load_source,
    read_manifest,
    record_index,
    segment_ids_and_positions,
)
from cpt_jax.data.tokenization import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 9
LENGTH = SEQ_LEN + 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """23 train examples in shards of 7 (4 shards), 2 val; example i starts with token i * 10."""
    return write_synthetic_source(tmp_path_factory.mktemp("syn"), "syn", 23, SEQ_LEN, val_examples=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    tok = make_sentencepiece(d)
    return make_prepared_source(d, tok, seq_len=16, val_examples=3, name="web", examples_per_shard=100), tok


def copy_of(directory, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def edit_manifest(directory, **changes):
    path = os.path.join(directory, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    with open(path, "w") as f:
        json.dump(manifest, f)


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_load_and_random_access(synthetic):
    source = load_source(synthetic)
    assert source.name == "syn" and source.split == "train"
    assert source.num_examples == 23 == len(source.dataset)
    assert isinstance(source.dataset, grain.MapDataset)
    assert source.manifest["shards"] == [f"train-{i:05d}-of-00004.array_record" for i in range(4)]
    assert source.dtype == np.uint16 and source.seq_len == SEQ_LEN
    for i in (22, 0, 7, 6, 13, 21, 3):  # across shard boundaries, any order
        example = source.dataset[i]
        assert example.dtype == np.uint16 and example.shape == (LENGTH,)
        np.testing.assert_array_equal(example, np.arange(i * LENGTH, (i + 1) * LENGTH))
    assert not example.flags.writeable  # a view of the record's bytes: nothing writes into the source
    batch = source.dataset[4:7].batch(3)[0]
    batch[:, 0] = 1  # what a batch stacks is an array of its own
    assert [int(x[0]) for x in source.dataset[4:7]] == [40, 50, 60]
    val = load_source(synthetic, "val")
    assert val.split == "val" and val.num_examples == 2
    assert [int(val.dataset[i][0]) for i in range(2)] == [230, 240]  # after the train examples


def test_prepared_source_round_trips_its_records(prepared):
    directory, tok_path = prepared
    tok = load_tokenizer(tok_path)
    source = load_source(directory)
    m = source.manifest
    assert source.name == "web" and source.num_examples == m["examples"]
    stream = np.concatenate([source.dataset[i] for i in range(source.num_examples)])
    assert stream.size == m["tokens"]
    # The train examples are the start of the tokenized document stream (make_prepared_source's
    # default documents), in order.
    expected = tok.encode_documents(make_documents(200, seed=3), num_threads=1, add_bos=m["add_bos"])
    np.testing.assert_array_equal(stream, expected[: stream.size])
    source.check_compatible(tokenizer_fingerprint=tok.fingerprint, vocab_size=tok.vocab_size, seq_len=16)
    source.check_compatible(tokenizer_fingerprint=None, vocab_size=1024, seq_len=16)  # bigger model vocab


def test_check_compatible_errors(synthetic):
    source = load_source(synthetic)
    manifest_path = os.path.join(synthetic, "manifest.json")
    with pytest.raises(ConfigError) as e:
        source.check_compatible(tokenizer_fingerprint="f" * 64, vocab_size=1000, seq_len=SEQ_LEN)
    one_line(e, manifest_path, "tokenizer_fingerprint 0000000000000000", "expected ffffffffffffffff")
    with pytest.raises(ConfigError) as e:
        source.check_compatible(tokenizer_fingerprint="0" * 64, vocab_size=999, seq_len=SEQ_LEN)
    one_line(e, manifest_path, "vocab_size 1000", "expected at most", "999")
    with pytest.raises(ConfigError) as e:
        source.check_compatible(tokenizer_fingerprint="0" * 64, vocab_size=1000, seq_len=SEQ_LEN + 1)
    one_line(e, manifest_path, f"seq_len {SEQ_LEN}", f"expected {SEQ_LEN + 1}")


def test_load_errors(synthetic, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(ConfigError) as e:
        load_source(missing)
    one_line(e, str(missing / "manifest.json"), "missing")

    d = copy_of(synthetic, tmp_path)
    manifest_path = str(d / "manifest.json")
    (d / "manifest.json").write_text("{ truncated")
    with pytest.raises(ConfigError) as e:
        load_source(d)
    one_line(e, manifest_path, "unreadable")

    cases = [
        (dict(seq_len=None), ["no key 'seq_len'"]),
        (dict(seq_len="9"), ["seq_len is '9'", "expected a int"]),
        (dict(format_version=99), ["format_version 99", "expected 1"]),
        (dict(dtype="int8"), ["dtype 'int8'"]),
        (dict(examples=22), ["23 train records", "expected 22"]),
        (dict(examples=0), ["0 train examples", "non-empty"]),
        (dict(seq_len=SEQ_LEN + 1), ["records of 20 bytes", "expected 22"]),
    ]
    for changes, needles in cases:
        shutil.rmtree(d)
        d = copy_of(synthetic, tmp_path)
        edit_manifest(d, **changes)
        with pytest.raises(ConfigError) as e:
            load_source(d)
        one_line(e, *needles)

    shutil.rmtree(d)
    d = copy_of(synthetic, tmp_path)
    os.remove(d / "train-00002-of-00004.array_record")
    with pytest.raises(ConfigError) as e:
        load_source(d)
    one_line(e, "train-00002-of-00004.array_record", "missing")

    edit_manifest(d, val_examples=0)
    with pytest.raises(ConfigError) as e:
        load_source(d, "val")
    one_line(e, "0 val examples", "non-empty")
    with pytest.raises(ConfigError) as e:
        load_source(d, "test")
    one_line(e, "'test'", "'train' or 'val'")


def test_read_manifest_returns_the_manifest(synthetic):
    manifest = read_manifest(synthetic)
    assert manifest["name"] == "syn" and manifest["examples"] == 23 and manifest["val_examples"] == 2


def test_epoch_permutation_is_a_fixed_shuffle():
    # Pinned: a resumed run must see the same order on any host, process and numpy version.
    assert epoch_permutation(0, "web", 0, 10).tolist() == [5, 4, 6, 0, 8, 7, 1, 2, 3, 9]
    assert epoch_permutation(1234, "code", 3, 7).tolist() == [6, 5, 4, 0, 3, 2, 1]
    n = 1000
    base = epoch_permutation(7, "web", 0, n)
    assert sorted(base.tolist()) == list(range(n))
    np.testing.assert_array_equal(base, epoch_permutation(7, "web", 0, n))
    for other in (epoch_permutation(7, "web", 1, n), epoch_permutation(7, "code", 0, n),
                  epoch_permutation(8, "web", 0, n)):
        assert sorted(other.tolist()) == list(range(n))
        assert not np.array_equal(other, base)
    with pytest.raises(ValueError):
        epoch_permutation(0, "web", 0, 0)
    with pytest.raises(ValueError):
        base[0] = 1  # cached arrays are read-only


def test_epoch_permutation_is_the_same_in_another_process():
    code = ("from cpt_jax.data.sources import epoch_permutation as p; "
            "print(p(5, 'wiki', 2, 50).tolist())")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == epoch_permutation(5, "wiki", 2, 50).tolist()


def test_record_index_visits_every_example_once_per_epoch():
    n = 37
    draws = [record_index(3, "web", n, k) for k in range(4 * n)]
    for epoch in range(4):
        block = draws[epoch * n:(epoch + 1) * n]
        assert sorted(block) == list(range(n))
        assert block == epoch_permutation(3, "web", epoch, n).tolist()
    assert draws[:n] != draws[n:2 * n]  # a fresh shuffle per epoch
    with pytest.raises(ValueError):
        record_index(3, "web", n, -1)


def test_segment_ids_and_positions():
    eos = 2
    # A stored example of 9 tokens; the model's inputs are the first 8.
    example = np.array([7, 8, 2, 5, 2, 2, 9, 4, 2])
    segment_ids, positions = segment_ids_and_positions(example[:-1], eos)
    assert segment_ids.tolist() == [1, 1, 1, 2, 2, 3, 4, 4]
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    assert segment_ids.dtype == np.int32 and positions.dtype == np.int32
    batch = np.array([[2, 3, 3, 3], [3, 3, 3, 3], [3, 3, 3, 2]])
    segment_ids, positions = segment_ids_and_positions(batch, eos)
    assert segment_ids.tolist() == [[1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_segment_ids_and_positions_equal_the_plain_statement():
    """The library's spread-from-the-starts computation gives what the cumulative statement gives:
    on random rows, rows of EOS only or none, EOS in the first and last columns, and on stored
    examples (seq_len + 1 tokens, searched whole) with length seq_len."""
    rng = np.random.default_rng(0)
    eos = 3
    cases = [rng.integers(0, 6, size=(7, 33), dtype=np.uint16), rng.integers(0, 40, size=(2, 3, 50)),
             np.full((2, 9), eos), np.zeros((3, 9), np.int32), np.array([[eos, 1, eos], [1, 1, eos]]),
             np.array([eos]), np.array([1, eos, eos, 2])]
    for tokens in cases:
        for length in sorted({tokens.shape[-1], max(1, tokens.shape[-1] - 1)}):
            got = segment_ids_and_positions(tokens, eos, length)
            want = reference_segments(tokens[..., :length], eos)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == np.int32 and g.shape == w.shape
                np.testing.assert_array_equal(g, w, err_msg=f"{tokens.tolist()}, length {length}")
    np.testing.assert_array_equal(segment_ids_and_positions(cases[0][:, :-1], eos)[1],
                                  reference_segments(cases[0][:, :-1], eos)[1])  # a strided view
    for length in (0, 34):
        with pytest.raises(ValueError, match="length"):
            segment_ids_and_positions(cases[0], eos, length)


def test_segment_ids_mark_every_document_of_a_prepared_source(prepared):
    directory, tok_path = prepared
    tok = load_tokenizer(tok_path)
    source = load_source(directory)
    batch = np.stack([source.dataset[i] for i in range(8)])
    segment_ids, positions = segment_ids_and_positions(batch[:, :-1], tok.eos_id)
    inputs = batch[:, :-1]
    for row, seg, pos in zip(inputs, segment_ids, positions, strict=True):
        # One segment per EOS (plus the one open at the end); positions restart after each EOS.
        assert seg[-1] == 1 + np.count_nonzero(row[:-1] == tok.eos_id)
        after_eos = np.flatnonzero(row[:-1] == tok.eos_id) + 1
        assert (pos[after_eos] == 0).all()
