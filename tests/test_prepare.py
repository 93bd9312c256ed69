"""prepare: round trips for every input kind, the manifest, dtypes, determinism across worker
counts, atomic output, and one clear error for every kind of bad input."""

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from data_helpers import (
    ODD_TEXTS,
    failing_process_task,
    make_documents,
    make_tfds_dataset,
    make_wordlevel_tokenizer,
    tfds_documents_in_order,
    write_jsonl,
    write_text_files,
)

from cpt_jax.config import ConfigError
from cpt_jax.data import documents as docs_lib
from cpt_jax.data import packing
from cpt_jax.data.documents import parse_input
from cpt_jax.data.packing import prepare
from cpt_jax.data.tokenization import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = make_documents(150, seed=5) + list(ODD_TEXTS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "data.jsonl", DOCS)


def read_records(path, dtype):
    reader = ArrayRecordReader(str(path))
    try:
        return [np.frombuffer(r, dtype=np.dtype(dtype).newbyteorder("<")) for r in reader.read_all()]
    finally:
        reader.close()


def read_split(out, manifest):
    """(train examples, val examples) as [n, seq_len + 1] arrays, in file order."""
    dtype = manifest["dtype"]
    train = [r for shard in manifest["shards"] for r in read_records(os.path.join(out, shard), dtype)]
    val = read_records(os.path.join(out, "val.array_record"), dtype)
    length = manifest["seq_len"] + 1
    return (np.stack(train) if train else np.empty((0, length))), (np.stack(val) if val else np.empty((0, length)))


def decode_documents(tok, stream, bos=False):
    """Split a token stream after each EOS and decode every complete document (without its BOS)."""
    ends = np.flatnonzero(stream == tok.eos_id)
    docs, start = [], 0
    for end in ends:
        if bos:
            assert stream[start] == tok.bos_id
        docs.append(tok.decode(stream[start + bos:end]))
        start = end + 1
    return docs


def assert_round_trip(out, manifest, tok, docs):
    """Train then val, concatenated, decode to the documents in order; the counts add up."""
    train, val = read_split(out, manifest)
    length = manifest["seq_len"] + 1
    assert train.shape == (manifest["examples"], length)
    assert val.shape == (manifest["val_examples"], length)
    stream = np.concatenate([train.reshape(-1), val.reshape(-1)])
    expected = tok.encode_documents(docs, num_threads=1, add_bos=manifest["add_bos"])
    assert expected.size == manifest["document_tokens"]
    # The stream is the tokenizer's own document stream, cut after whole examples.
    np.testing.assert_array_equal(stream, expected[: stream.size])
    assert manifest["dropped_tokens"] == expected.size - stream.size < length
    decoded = decode_documents(tok, stream, manifest["add_bos"])
    assert decoded == list(docs[: len(decoded)])
    assert len(decoded) >= len(docs) - 1 - manifest["dropped_tokens"]


def assert_nothing_written(out):
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert not glob.glob(os.path.join(parent, ".*incomplete*")), os.listdir(parent)


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_jsonl_round_trip_and_manifest(tmp_path, sp_path, corpus, capsys):
    out = str(tmp_path / "web")
    manifest = prepare([f"jsonl:{corpus}"], sp_path, 16, out, 3, examples_per_shard=40)
    tok = load_tokenizer(sp_path)
    assert_round_trip(out, manifest, tok, DOCS)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == manifest
    length = 17
    text_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    total = manifest["document_tokens"] // length
    assert manifest["format_version"] == 1
    assert manifest["name"] == "web"
    assert manifest["inputs"] == [f"jsonl:{corpus}"]
    assert manifest["tokenizer_path"] == sp_path
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint
    assert (manifest["vocab_size"], manifest["eos_id"], manifest["seq_len"]) == (320, 2, 16)
    assert manifest["dtype"] == "uint16"
    assert manifest["examples"] == total - 3 and manifest["val_examples"] == 3
    assert manifest["tokens"] == manifest["examples"] * length
    assert manifest["documents"] == len(DOCS)
    assert manifest["text_bytes"] == text_bytes
    assert manifest["bytes_per_token"] == pytest.approx(text_bytes / manifest["document_tokens"])
    assert manifest["skipped_records"] == 0
    n_shards = -(-manifest["examples"] // 40)
    assert manifest["shards"] == [f"train-{i:05d}-of-{n_shards:05d}.array_record" for i in range(n_shards)]
    assert sorted(os.listdir(out)) == sorted(manifest["shards"] + ["val.array_record", "manifest.json"])
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o700)  # not the private mode of a temp dir
    assert_nothing_written(str(tmp_path / "leftover-check"))
    err = capsys.readouterr().err
    assert "prepared web:" in err and "tokens/s" in err and "\r" not in err  # no progress bar off a TTY


def test_huggingface_tokenizer_round_trip(tmp_path, hf_path, corpus):
    out = str(tmp_path / "hf")
    manifest = prepare([f"jsonl:{corpus}"], hf_path, 32, out, 2, name="hf-source")
    assert manifest["name"] == "hf-source"
    assert manifest["tokenizer_kind"] == "huggingface"
    assert_round_trip(out, manifest, load_tokenizer(hf_path), DOCS)


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    docs = [" ".join(d.split()) for d in make_documents(60, seed=6)]  # single-spaced, one line
    tok_path = make_wordlevel_tokenizer(tmp_path / "tok", docs, vocab_size=70_000)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    out = str(tmp_path / "out")
    manifest = prepare([f"jsonl:{corpus}"], tok_path, 8, out, 1)
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_000
    train, _ = read_split(out, manifest)
    assert train.min() > 65535  # the real words have ids above the uint16 range
    assert_round_trip(out, manifest, load_tokenizer(tok_path), docs)


def test_text_and_jsonl_field_inputs_in_order(tmp_path, sp_path):
    text_docs = ["first file\nwith two lines\n", "second  file\twith odd spacing", "日本語 third"]
    write_text_files(tmp_path / "texts", text_docs)
    jsonl_docs = make_documents(40, seed=7)
    corpus = write_jsonl(tmp_path / "c" / "x.jsonl", jsonl_docs, field="content")
    out = str(tmp_path / "out")
    specs = [f"text:{tmp_path}/texts/*.txt", f"jsonl:{corpus}:content"]
    manifest = prepare(specs, sp_path, 8, out, 1)
    assert manifest["inputs"] == specs
    assert manifest["documents"] == len(text_docs) + len(jsonl_docs)
    assert_round_trip(out, manifest, load_tokenizer(sp_path), text_docs + jsonl_docs)


def test_documents_follow_the_tokenizers_bos_convention(tmp_path, sp_path, corpus):
    """--bos auto adds BOS where the tokenizer itself does (sentencepiece with a BOS piece as Llama 2;
    a Llama-3-style template), not for a Qwen2-style tokenizer.json; never/always override it. In
    the trainer's batch fields a document starts at its BOS (position 0) and ends at its EOS."""
    from data_helpers import make_hf_tokenizer

    from cpt_jax.data.pipeline import BatchFields

    llama3 = make_hf_tokenizer(tmp_path / "llama3", eos="<|end_of_text|>", extra_special=["<|begin_of_text|>"],
                               template_bos="<|begin_of_text|>")
    qwen2 = make_hf_tokenizer(tmp_path / "qwen2", extra_special=["<|im_start|>", "<|im_end|>"],
                              config={"bos_token": None, "eos_token": "<|endoftext|>"})
    for name, tok_path, bos, starts_with_bos in (("sp", sp_path, "auto", True), ("llama3", llama3, "auto", True),
                                                 ("qwen2", qwen2, "auto", False), ("sp_never", sp_path, "never", False),
                                                 ("llama3_always", llama3, "always", True)):
        out = str(tmp_path / f"out_{name}")
        manifest = prepare([f"jsonl:{corpus}"], tok_path, 16, out, 3, bos=bos)
        assert (manifest["bos"], manifest["add_bos"]) == (bos, starts_with_bos), name
        tok = load_tokenizer(tok_path)
        assert_round_trip(out, manifest, tok, DOCS)  # checks every document's first token is BOS when added
        train, _ = read_split(out, manifest)
        assert bool(train[0, 0] == tok.bos_id) is starts_with_bos, name
        fields = BatchFields(tok.eos_id)(train)
        after_eos = np.zeros(fields["inputs"].shape, bool)
        after_eos[:, 1:] = fields["inputs"][:, :-1] == tok.eos_id
        np.testing.assert_array_equal(fields["positions"][after_eos], 0)
        if starts_with_bos:
            np.testing.assert_array_equal(fields["inputs"][after_eos], tok.bos_id)
    with pytest.raises(ConfigError) as e:
        prepare([f"jsonl:{corpus}"], qwen2, 16, str(tmp_path / "no_bos"), 3, bos="always")
    one_line(e, "--bos always", qwen2, "has no BOS token")
    assert_nothing_written(str(tmp_path / "no_bos"))


def _columnar_inputs(tmp_path, docs, column="text"):
    """The documents as two Parquet files and as a `datasets.Dataset.save_to_disk` directory (two
    Arrow IPC stream files and the state.json that lists them), written with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), column: docs})
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 70), tmp_path / "pq" / "part-0.parquet", row_group_size=16)
    pq.write_table(table.slice(70), tmp_path / "pq" / "part-1.parquet")
    arrow = tmp_path / "saved"
    arrow.mkdir()
    files = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(files, (table.slice(0, 90), table.slice(90)), strict=True):
        with pa.OSFile(str(arrow / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in part.to_batches(max_chunksize=25):
                writer.write_batch(batch)
    (arrow / "state.json").write_text(json.dumps({"_data_files": [{"filename": f} for f in files]}))
    return f"{tmp_path}/pq/*.parquet", str(arrow)


def test_parquet_and_arrow_inputs_give_the_examples_of_jsonl(tmp_path, sp_path, corpus, monkeypatch):
    monkeypatch.setattr(docs_lib, "TASK_BYTES", 2000)  # several tasks per file
    parquet, arrow = _columnar_inputs(tmp_path, DOCS, column="body")
    outputs = {}
    for kind, spec in (("jsonl", f"jsonl:{corpus}"), ("parquet", f"parquet:{parquet}:body"),
                       ("arrow", f"arrow:{arrow}:body")):
        out = str(tmp_path / kind)
        manifest = prepare([spec], sp_path, 16, out, 3, workers=2 if kind == "parquet" else 1)
        outputs[kind] = (read_split(out, manifest), manifest)
    (train, val), reference = outputs.pop("jsonl")
    for kind, ((t, v), manifest) in outputs.items():
        np.testing.assert_array_equal(t, train, err_msg=kind)
        np.testing.assert_array_equal(v, val, err_msg=kind)
        for key in ("documents", "document_tokens", "text_bytes", "examples"):
            assert manifest[key] == reference[key], (kind, key)


def test_parquet_and_arrow_errors(tmp_path, sp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet, arrow = _columnar_inputs(tmp_path, DOCS)
    cases = [
        (f"parquet:{parquet}:content", ["part-0.parquet: no column 'content', expected one of id, text"]),
        (f"parquet:{parquet}:id", ["part-0.parquet: column 'id' is int64, expected a string column"]),
        (f"arrow:{arrow}:content", ["data-00000-of-00002.arrow: no column 'content'"]),
        (f"arrow:{tmp_path}/nowhere", ["nowhere is not a directory"]),
        (f"parquet:{tmp_path}/none*.parquet", ["matches no file"]),
    ]
    (tmp_path / "fake.parquet").write_text("not parquet")
    cases.append((f"parquet:{tmp_path}/fake.parquet", ["fake.parquet: not a readable parquet file"]))
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), tmp_path / "nulls.parquet")
    for spec, needles in cases:
        with pytest.raises(ConfigError) as e:
            prepare([spec], sp_path, 4, str(tmp_path / "out"), 1)
        one_line(e, *needles)
        assert_nothing_written(str(tmp_path / "out"))
    # A null is a document without text: counted as empty, not an error.
    manifest = prepare([f"parquet:{tmp_path}/nulls.parquet"], sp_path, 2, str(tmp_path / "nulls"), 1)
    assert (manifest["documents"], manifest["empty_documents"]) == (2, 1)


def test_parse_input():
    assert parse_input("jsonl:a/*.jsonl") == docs_lib.InputSpec("jsonl:a/*.jsonl", "jsonl", pattern="a/*.jsonl")
    assert parse_input("jsonl:a/*.jsonl:body").field == "body"
    assert parse_input("text:/x/**/*.md").pattern == "/x/**/*.md"
    assert parse_input("parquet:/d/*.parquet:content") == docs_lib.InputSpec("parquet:/d/*.parquet:content", "parquet",
                                                                         pattern="/d/*.parquet", field="content")
    assert parse_input("arrow:/saved/ds") == docs_lib.InputSpec("arrow:/saved/ds", "arrow", pattern="/saved/ds")
    spec = parse_input("tfds:wiki/en:train[:10%]:content")
    assert (spec.tfds_name, spec.tfds_config, spec.split, spec.feature) == ("wiki", "en", "train[:10%]", "content")
    spec = parse_input("tfds:wiki")
    assert (spec.tfds_name, spec.tfds_config, spec.split, spec.feature) == ("wiki", "", "train", "text")
    assert parse_input("tfds:wiki::body").split == "train" and parse_input("tfds:wiki::body").feature == "body"
    for bad in ("csv:x.csv", "nothing", "jsonl:", "tfds:a/b/c"):
        with pytest.raises(ConfigError) as e:
            parse_input(bad)
        one_line(e, repr(bad))


def test_one_or_two_workers_give_identical_output(tmp_path, sp_path, corpus, monkeypatch):
    # Small tasks, so that two workers really split the input between them.
    monkeypatch.setattr(docs_lib, "TASK_BYTES", 1500)
    monkeypatch.setattr(docs_lib, "TASK_FILES", 2)
    write_text_files(tmp_path / "texts", make_documents(9, seed=8))
    specs = [f"jsonl:{corpus}", f"text:{tmp_path}/texts/*.txt"]
    outputs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        manifest = prepare(specs, sp_path, 16, out, 4, workers=workers, name="same", examples_per_shard=30)
        manifest.pop("created")
        files = {}
        for file_name in os.listdir(out):
            if file_name != "manifest.json":
                with open(os.path.join(out, file_name), "rb") as f:
                    files[file_name] = f.read()
        outputs[workers] = (manifest, files)
    assert outputs[1] == outputs[2]


def test_tfds_input(tmp_path, sp_path):
    data_dir = str(tmp_path / "tfds")
    docs = make_documents(60, seed=9)
    make_tfds_dataset(data_dir, {"train": docs[:50], "test": docs[50:]})
    out = str(tmp_path / "out")
    manifest = prepare(["tfds:cpt_tiny_text", "tfds:cpt_tiny_text:test:text"], sp_path, 16, out, 2,
                       tfds_data_dir=data_dir)
    order = tfds_documents_in_order(data_dir) + tfds_documents_in_order(data_dir, split="test")
    assert sorted(order) == sorted(docs)
    assert manifest["documents"] == 60
    assert_round_trip(out, manifest, load_tokenizer(sp_path), order)
    sliced = prepare(["tfds:cpt_tiny_text:train[:10]"], sp_path, 16, str(tmp_path / "sliced"), 1,
                     tfds_data_dir=data_dir)
    assert sliced["documents"] == 10


def test_tfds_errors(tmp_path, sp_path):
    data_dir = str(tmp_path / "tfds")
    make_tfds_dataset(data_dir, {"train": make_documents(10)})
    out = str(tmp_path / "out")
    cases = [
        ("tfds:not_there", data_dir, ["not_there", "not prepared", data_dir]),
        ("tfds:cpt_tiny_text:validation", data_dir, ["no split 'validation'", "train"]),
        ("tfds:cpt_tiny_text:train:body", data_dir, ["no feature 'body'", "text"]),
        ("tfds:cpt_tiny_text:train:index", data_dir, ["feature 'index'", "Text"]),
        ("tfds:cpt_tiny_text", str(tmp_path / "nope"), ["--tfds_data_dir", "no such directory"]),
    ]
    for spec, ddir, needles in cases:
        with pytest.raises(ConfigError) as e:
            prepare([spec], sp_path, 16, out, 1, tfds_data_dir=ddir)
        one_line(e, *needles)
        assert_nothing_written(out)
    info_path = os.path.join(data_dir, "cpt_tiny_text", "1.0.0", "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(ConfigError) as e:
        prepare(["tfds:cpt_tiny_text"], sp_path, 16, out, 1, tfds_data_dir=data_dir)
    one_line(e, "cpt_tiny_text", data_dir, "tfrecord", "expected array_record")
    assert_nothing_written(out)


class Boom(RuntimeError):
    pass


def test_interrupted_prepare_leaves_nothing(tmp_path, sp_path, corpus, monkeypatch):
    monkeypatch.setattr(docs_lib, "TASK_BYTES", 2000)
    real = packing._process_task
    calls = []

    def failing(task, *args):
        calls.append(task)
        if len(calls) == 3:  # after some examples were already written
            raise Boom("worker died")
        return real(task, *args)

    monkeypatch.setattr(packing, "_process_task", failing)
    out = str(tmp_path / "out")
    with pytest.raises(Boom):
        prepare([f"jsonl:{corpus}"], sp_path, 8, out, 1, examples_per_shard=5)
    assert_nothing_written(out)

    def interrupt(task, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(packing, "_process_task", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare([f"jsonl:{corpus}"], sp_path, 8, out, 1)
    assert_nothing_written(out)


def test_worker_process_failure_leaves_nothing(tmp_path, sp_path, corpus, monkeypatch):
    # The patched task function is pickled by reference and re-imported by the spawned workers.
    monkeypatch.setattr(docs_lib, "TASK_BYTES", 2000)
    monkeypatch.setattr(packing, "_process_task", failing_process_task)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="worker died"):
        prepare([f"jsonl:{corpus}"], sp_path, 8, out, 1, workers=2)
    assert_nothing_written(out)


def test_bad_jsonl_records(tmp_path, sp_path, monkeypatch):
    # Blocks smaller than a line: line numbers must stay right across task boundaries.
    monkeypatch.setattr(docs_lib, "TASK_BYTES", 64)
    good = make_documents(30, seed=10)
    lines = [json.dumps({"text": d}) for d in good]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"body": "no text field"}))
    lines.insert(9, json.dumps({"text": 42}))
    lines.insert(11, json.dumps(["a", "list"]))
    lines.insert(13, '{"text": "lone \\ud800 surrogate"}')
    lines.insert(15, "")  # blank lines are not records
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines[:20]) + "\n").encode() + b'{"text": "bad \xff byte"}\n'
                     + ("\n".join(lines[20:]) + "\n").encode())
    out = str(tmp_path / "out")
    expected = {
        4: "not valid JSON",
        8: "expected an object with field 'text'",
        10: "is a JSON int, expected a string",
        12: "a JSON list",
        14: "lone surrogate",
    }
    first_line, first_msg = min(expected.items())
    with pytest.raises(ConfigError) as e:
        prepare([f"jsonl:{path}"], sp_path, 8, out, 1)
    one_line(e, f"{path}:{first_line}: {first_msg}" if first_msg == "not valid JSON" else f"{path}:{first_line}")
    assert_nothing_written(out)
    # Each kind alone, so every message is checked.
    for line_no, needle in expected.items():
        single = tmp_path / f"single{line_no}.jsonl"
        single.write_text(json.dumps({"text": "ok"}) + "\n" + lines[line_no - 1] + "\n")
        with pytest.raises(ConfigError) as e:
            prepare([f"jsonl:{single}"], sp_path, 8, out, 1)
        one_line(e, f"{single}:2:", needle)
        assert_nothing_written(out)
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError) as e:
        prepare([f"jsonl:{not_utf8}"], sp_path, 8, out, 1)
    one_line(e, f"{not_utf8}:2:", "not valid UTF-8")
    assert_nothing_written(out)

    manifest = prepare([f"jsonl:{path}"], sp_path, 8, out, 1, skip_bad_records=True)
    assert manifest["skipped_records"] == 6
    assert manifest["documents"] == len(good)
    assert_round_trip(out, manifest, load_tokenizer(sp_path), good)


def test_bad_text_file(tmp_path, sp_path):
    write_text_files(tmp_path / "texts", ["good one", "good two"])
    bad = tmp_path / "texts" / "doc-00001b.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError) as e:
        prepare([f"text:{tmp_path}/texts/*.txt"], sp_path, 2, out, 1)
    one_line(e, str(bad), "not valid UTF-8")
    assert_nothing_written(out)
    manifest = prepare([f"text:{tmp_path}/texts/*.txt"], sp_path, 2, out, 1, skip_bad_records=True)
    assert manifest["skipped_records"] == 1 and manifest["documents"] == 2


def test_bad_arguments(tmp_path, sp_path, corpus):
    out = str(tmp_path / "out")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a tokenizer")
    cases = [
        (dict(inputs=[f"jsonl:{tmp_path}/none*.jsonl"]), ["none*.jsonl", "matches no file"]),
        (dict(inputs=[]), ["--input", "none given"]),
        (dict(inputs=["csv:x.csv"]), ["csv", "unknown kind"]),
        (dict(tokenizer_path=str(tmp_path / "missing.model")), ["missing.model", "no such file"]),
        (dict(tokenizer_path=str(garbage)), [str(garbage), "not a sentencepiece model"]),
        (dict(val_examples=10_000), ["--val_examples: 10000", "fewer than the"]),
        (dict(seq_len=100_000), ["fewer than one example", "non-empty source"]),
        (dict(seq_len=0), ["--seq_len: 0"]),
        (dict(val_examples=-1), ["--val_examples: -1"]),
        (dict(workers=0), ["--workers: 0"]),
    ]
    for change, needles in cases:
        args = dict(inputs=[f"jsonl:{corpus}"], tokenizer_path=sp_path, seq_len=16, out_dir=out, val_examples=2)
        args.update(change)
        with pytest.raises(ConfigError) as e:
            prepare(**args)
        one_line(e, *needles)
        assert_nothing_written(out)


def test_existing_output_directory(tmp_path, sp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError) as e:
        prepare([f"jsonl:{corpus}"], sp_path, 16, str(out), 2)
    one_line(e, str(out), "not empty")
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = prepare([f"jsonl:{corpus}"], sp_path, 16, str(empty), 2)
    assert manifest["examples"] > 0 and (empty / "manifest.json").exists()


def test_cli(tmp_path, sp_path, corpus):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cpt_jax.prepare", "--input", f"jsonl:{corpus}", "--tokenizer", sp_path,
           "--seq_len", "16", "--out", str(out), "--val_examples", "2", "--name", "cli-source"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "prepared cli-source:" in proc.stderr
    assert json.loads((out / "manifest.json").read_text())["name"] == "cli-source"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)  # out now exists
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --out {out}: exists and is not empty") and proc.stderr.count("\n") == 1
    help_proc = subprocess.run([sys.executable, "-m", "cpt_jax.prepare", "--help"], cwd=REPO, capture_output=True,
                               text=True)
    assert help_proc.returncode == 0 and "--skip_bad_records" in help_proc.stdout


def test_progress_bar_on_a_terminal(tmp_path, sp_path, corpus, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(docs_lib, "TASK_BYTES", 2000)
    prepare([f"jsonl:{corpus}"], sp_path, 16, str(tmp_path / "out"), 2, name="tty")
    text = term.getvalue()
    assert "\rprepare tty:" in text and "docs (" in text and "tokens (" in text and "/s)" in text
    assert text.split("\r")[-1].startswith("\033[Kprepared tty:")  # the bar is cleared, the summary stays
