"""Tokenizers: both backends, special ids, fingerprints, load errors, training and the CLI."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import (
    ODD_TEXTS,
    make_documents,
    make_hf_tokenizer,
    make_sentencepiece,
    write_jsonl,
)

from cpt_jax import tokenizer as cli
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import load_tokenizer, token_dtype, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = make_documents(30, seed=11) + list(ODD_TEXTS) + [" leading space", "trailing space ", "x"]


def _one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_sentencepiece_ids_and_round_trip(sp_path):
    tok = load_tokenizer(sp_path)
    assert tok.kind == "sentencepiece"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (320, 1, 2, 3)
    assert tok.path == sp_path
    assert tok.dtype == np.uint16
    ids = tok.encode_batch(TEXTS, num_threads=2)
    assert len(ids) == len(TEXTS)
    for text, seq in zip(TEXTS, ids, strict=True):
        assert isinstance(seq, np.ndarray) and seq.ndim == 1 and seq.size > 0
        assert not np.isin(seq, [tok.bos_id, tok.eos_id, tok.pad_id]).any()  # no specials added
        assert seq.max() < tok.vocab_size
        assert tok.decode(seq) == text
        assert tok.decode(list(seq)) == text


def test_sentencepiece_byte_fallback_covers_unseen_characters(sp_path):
    tok = load_tokenizer(sp_path)
    text = "Ωμέγα ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"  # characters absent from the training text
    (seq,) = tok.encode_batch([text])
    assert 0 not in seq  # no unk
    assert tok.decode(seq) == text


def test_huggingface_ids_and_round_trip(hf_path):
    tok = load_tokenizer(hf_path)
    assert tok.kind == "huggingface"
    assert tok.vocab_size == 500
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None
    assert tok.pad_id == tok.eos_id  # no pad token: eos stands in
    for text, seq in zip(TEXTS, tok.encode_batch(TEXTS), strict=True):
        assert seq.dtype == np.int32
        assert tok.eos_id not in seq
        assert tok.decode(seq) == text


def test_huggingface_directory_and_special_token_candidates(tmp_path):
    path = make_hf_tokenizer(tmp_path, eos=None, extra_special=["<s>", "</s>", "<pad>"])
    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert tok.path == path
    hf = tok._tok
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.token_to_id("<s>"), hf.token_to_id("</s>"),
                                                    hf.token_to_id("<pad>"))


def test_huggingface_tokenizer_config_names_the_special_tokens(tmp_path):
    config = {"eos_token": "<|im_end|>", "bos_token": None,
              "pad_token": {"content": "<|pad|>", "special": True}}
    make_hf_tokenizer(tmp_path, extra_special=["<|im_end|>", "<|pad|>", "<s>"], config=config)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    hf = tok._tok
    # The config wins over the built-in candidates (<|endoftext|>, <s>).
    assert tok.eos_id == hf.token_to_id("<|im_end|>")
    assert tok.bos_id is None
    assert tok.pad_id == hf.token_to_id("<|pad|>")


def test_huggingface_errors(tmp_path):
    no_eos = make_hf_tokenizer(tmp_path / "no_eos", eos=None)
    with pytest.raises(ConfigError) as e:
        load_tokenizer(no_eos)
    _one_line_error(e, no_eos, "end-of-text")

    make_hf_tokenizer(tmp_path / "bad_config", config={"eos_token": "<|nope|>"})
    with pytest.raises(ConfigError) as e:
        load_tokenizer(tmp_path / "bad_config" / "tokenizer.json")
    _one_line_error(e, "tokenizer_config.json", "<|nope|>")

    make_hf_tokenizer(tmp_path / "broken_config")
    (tmp_path / "broken_config" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(tmp_path / "broken_config" / "tokenizer.json")
    _one_line_error(e, "tokenizer_config.json", "unreadable")


def test_load_errors(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(missing)
    _one_line_error(e, missing, "no such file")

    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 definitely not a model")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(garbage)
    _one_line_error(e, str(garbage), "not a sentencepiece model or tokenizer.json")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model": 42}')
    with pytest.raises(ConfigError) as e:
        load_tokenizer(bad_json)
    _one_line_error(e, str(bad_json), "not a sentencepiece model or tokenizer.json")

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ConfigError) as e:
        load_tokenizer(empty_dir)
    _one_line_error(e, str(empty_dir), "tokenizer.json")


def test_fingerprint_is_the_sha256_of_the_file(tmp_path, sp_path, hf_path):
    for path in (sp_path, hf_path):
        with open(path, "rb") as f:
            assert load_tokenizer(path).fingerprint == hashlib.sha256(f.read()).hexdigest()
    # Same content elsewhere: same fingerprint. Changed content: another one.
    copy = tmp_path / "copy.model"
    shutil.copy(sp_path, copy)
    assert load_tokenizer(copy).fingerprint == load_tokenizer(sp_path).fingerprint
    other = make_sentencepiece(tmp_path, vocab_size=330, name="other.model")
    assert load_tokenizer(other).fingerprint != load_tokenizer(sp_path).fingerprint
    edited = tmp_path / "edited" / "tokenizer.json"
    edited.parent.mkdir()
    edited.write_text(json.dumps(json.loads(open(hf_path).read()), indent=4))
    assert load_tokenizer(edited).fingerprint != load_tokenizer(hf_path).fingerprint


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_encode_documents_appends_eos(which, sp_path, hf_path):
    tok = load_tokenizer(sp_path if which == "sp" else hf_path)
    texts = TEXTS[:5]
    flat = tok.encode_documents(texts, num_threads=1)
    assert flat.dtype == tok.dtype
    expected = np.concatenate([np.append(seq, tok.eos_id) for seq in tok.encode_batch(texts)])
    np.testing.assert_array_equal(flat, expected)
    assert tok.encode_documents([]).size == 0


def test_encode_documents_with_bos(sp_path):
    tok = load_tokenizer(sp_path)
    texts = [TEXTS[0], "", TEXTS[1]]  # an empty text still gets its BOS and EOS, in that order
    flat = tok.encode_documents(texts, num_threads=1, add_bos=True)
    expected = np.concatenate([[tok.bos_id, *seq, tok.eos_id] for seq in tok.encode_batch(texts)])
    np.testing.assert_array_equal(flat, expected.astype(tok.dtype))


def test_bos_convention_of_each_tokenizer_kind(sp_path, tmp_path):
    """`adds_bos`: what the tokenizer itself does, which `prepare --bos auto` follows."""
    sp = load_tokenizer(sp_path)
    assert sp.bos_id == 1 and sp.adds_bos  # a sentencepiece model with a BOS piece, as Llama 2's
    llama3 = load_tokenizer(make_hf_tokenizer(tmp_path / "llama3", eos="<|end_of_text|>",
                                              extra_special=["<|begin_of_text|>"], template_bos="<|begin_of_text|>"))
    assert llama3.adds_bos and llama3.bos_id == llama3._tok.token_to_id("<|begin_of_text|>")
    qwen2 = load_tokenizer(make_hf_tokenizer(tmp_path / "qwen2", extra_special=["<|im_start|>", "<|im_end|>"],
                                             config={"bos_token": None, "eos_token": "<|endoftext|>"}))
    assert qwen2.bos_id is None and not qwen2.adds_bos
    # Mistral's way: tokenizer_config.json says add_bos_token; it also overrides a template.
    mistral = load_tokenizer(make_hf_tokenizer(tmp_path / "mistral", eos="</s>", extra_special=["<s>"],
                                               config={"add_bos_token": True, "bos_token": "<s>"}))
    assert mistral.adds_bos and mistral.bos_id == mistral._tok.token_to_id("<s>")
    plain = load_tokenizer(make_hf_tokenizer(tmp_path / "plain", eos="</s>", extra_special=["<s>"]))
    assert plain.bos_id is not None and not plain.adds_bos  # a BOS token the tokenizer never adds
    off = load_tokenizer(make_hf_tokenizer(tmp_path / "off", eos="<|end_of_text|>", extra_special=["<|begin_of_text|>"],
                                           template_bos="<|begin_of_text|>", config={"add_bos_token": False}))
    assert not off.adds_bos


def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32


def test_train_sentencepiece_errors(tmp_path, sp_path):
    with pytest.raises(ConfigError) as e:
        train_sentencepiece(make_documents(20), sp_path, 300)
    _one_line_error(e, sp_path, "already exists")
    with pytest.raises(ConfigError) as e:
        train_sentencepiece(make_documents(20), tmp_path / "big.model", 50_000)
    _one_line_error(e, "Vocabulary size")
    assert not (tmp_path / "big.model").exists()
    with pytest.raises(ConfigError):
        train_sentencepiece(make_documents(20), tmp_path / "x.model", 300, model_type="nope")


def test_cli_trains_a_model(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(200, seed=4), field="body")
    out = tmp_path / "new.model"
    proc = subprocess.run([sys.executable, "-m", "cpt_jax.tokenizer", "train", "--input", f"jsonl:{corpus}:body",
                           "--vocab_size", "330", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(out)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (330, 2, 3, 1)
    doc = make_documents(1, seed=99)[0]
    assert tok.decode(tok.encode_batch([doc])[0]) == doc


def test_cli_info_and_errors(tmp_path, sp_path, capsys):
    assert cli.main(["info", sp_path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 320 and info["eos_id"] == 2 and len(info["tokenizer_fingerprint"]) == 64

    assert cli.main(["train", "--input", f"jsonl:{tmp_path}/nothing*.jsonl", "--vocab_size", "300",
                     "--out", str(tmp_path / "t.model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input jsonl:") and "matches no file" in err and err.count("\n") == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    assert cli.main(["train", "--input", f"jsonl:{bad}", "--vocab_size", "300",
                     "--out", str(tmp_path / "t.model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: not valid JSON") and err.count("\n") == 1
    assert not (tmp_path / "t.model").exists()

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    assert "--vocab_size" in capsys.readouterr().out
