"""Hugging Face interop: logit parity per family, bit-identical round trip, the continued run's LR,
the recipe config, and bad input (one line, exit 2, nothing written).

Every Hugging Face model here is a random tiny one written by transformers in the test itself.
"""

import json
import os
import shutil

import numpy as np
import pytest

from cpt_jax import checkpoint, checkpoint_model, hf, hf_check, hf_export, hf_import, model, train
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import file_sha256

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_helpers import FAMILIES, LR_MIN, VOCAB, safetensors_of  # noqa: E402

# What each import must become: (qk_norm, norm_position, norm, mlp, partial_rotary_factor, norm_eps, max_seq_len).
EXPECTED = {
    "llama": ("none", "pre", "rmsnorm", "swiglu", 1.0, 1e-6, 256),
    "mistral": ("none", "pre", "rmsnorm", "swiglu", 1.0, 1e-6, 48),
    "qwen2": ("none", "pre", "rmsnorm", "swiglu", 1.0, 1e-6, 128),
    "qwen3": ("head", "pre", "rmsnorm", "swiglu", 1.0, 1e-6, 128),
    "qwen3_untied": ("head", "pre", "rmsnorm", "swiglu", 1.0, 1e-6, 128),
    "olmo2": ("projection", "post", "rmsnorm", "swiglu", 1.0, 1e-6, 128),
    "nemotron": ("none", "pre", "layernorm1p", "squared_relu", 0.5, 1e-5, 128),
}


# ============================================================================ parity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_in_float32(zoo, family):
    r = hf_check.check_logits(zoo.hf(family), zoo.ckpt(family), batch_size=2, seq_len=64)
    print(f"{family}: max |diff| {r['max_abs_diff']:.2e} (max |logit| {r['max_abs_logit']:.2f})")
    assert r["max_abs_logit"] > 1.0  # the comparison is not between near-zero logits
    assert r["max_abs_diff"] <= 1e-4, r


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_metadata(zoo, family):
    spec, ckpt = FAMILIES[family], zoo.ckpt(family)
    meta = checkpoint.read_metadata(ckpt)
    assert checkpoint.read_metadata(os.path.join(ckpt, "checkpoints")) == meta
    assert checkpoint.resolve(ckpt) == (os.path.join(ckpt, "checkpoints"), 0)
    assert meta["step"] == 0 and meta["tokens_seen"] == 0
    assert meta["lr_min"] == LR_MIN[family] and meta["lr_max"] is None
    assert meta["schedule"] == {"name": "imported", "lr_max": None, "lr_min": LR_MIN[family], "source": "flags"}
    assert meta["source"]["format"] == "huggingface" and meta["source"]["architecture"] == spec["cls"]
    assert meta["source"]["model_dir"] == zoo.hf(family) and meta["source"]["dtype"] == spec["dtype"]

    assert meta["source_dtype"] == spec["dtype"]
    c, mc = spec["config"], model.ModelConfig.from_config(meta["model"])
    assert (mc.n_layers, mc.d_model, mc.n_heads, mc.n_kv_heads, mc.d_ff, mc.vocab_size, mc.hd) == (
        2, 64, 4, c["num_key_value_heads"], 96, VOCAB, c.get("head_dim", 16))
    assert mc.rope_theta == c["rope_theta"] and mc.param_dtype == "float32"
    assert mc.qkv_bias == (family == "qwen2") and mc.tie_embeddings == c["tie_word_embeddings"]
    assert (mc.qk_norm, mc.norm_position, mc.norm, mc.mlp, mc.partial_rotary_factor, mc.norm_eps,
            mc.max_seq_len) == EXPECTED[family]
    if family == "llama":
        assert (mc.rope_scaling, mc.rope_factor, mc.rope_low_freq_factor, mc.rope_high_freq_factor,
                mc.rope_original_max_seq_len) == ("llama3", 8.0, 1.0, 4.0, 64)
        assert os.path.isfile(os.path.join(zoo.hf(family), hf_import.INDEX_FILE))  # imported from shards
    else:
        assert mc.rope_scaling == "none"
    assert meta["param_shapes"] == checkpoint.param_shapes(model.abstract_params(mc))

    main = "tokenizer.json" if spec["tokenizer"] == "hf" else "tokenizer.model"
    assert meta["tokenizer"] == os.path.join(ckpt, "tokenizer", main)
    assert meta["tokenizer_fingerprint"] == file_sha256(meta["tokenizer"])
    assert meta["tokenizer_fingerprint"] == file_sha256(os.path.join(zoo.hf(family), main))
    copied = sorted(os.listdir(os.path.join(ckpt, "tokenizer")))
    assert copied == (["tokenizer.json", "tokenizer_config.json"] if spec["tokenizer"] == "hf" else [main])
    assert sorted(os.listdir(ckpt)) == ["checkpoints", "tokenizer"]


def test_bf16_weights_are_imported_exactly(zoo):
    decoder, c = checkpoint_model.load(zoo.ckpt("qwen2"), dtype="float32")
    assert c.dtype == "float32"
    original = safetensors_of(zoo.hf("qwen2"))
    embed = original["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16
    np.testing.assert_array_equal(np.asarray(decoder.embed[...]), embed.float().numpy())
    bq = original["model.layers.1.self_attn.q_proj.bias"].float().numpy().reshape(4, 16)
    np.testing.assert_array_equal(np.asarray(decoder.layers.bq[...])[1], bq)
    # Without a dtype the model computes in the checkpoint's configured compute dtype.
    _, c = checkpoint_model.load(zoo.ckpt("qwen2"))
    assert c.dtype == "bfloat16"


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_transformers_4_config_json_imports_the_same_model(zoo, tmp_path, family):
    """config.json with top-level rope_theta/rope_scaling/partial_rotary_factor and torch_dtype, as
    4.x writes it (the published Minitron and Nemotron-Mini configs)."""
    src = shutil.copytree(zoo.hf(family), tmp_path / "hf4")
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = dict(rope, type=kind) if kind != "default" else None  # the oldest spelling: "type"
    cfg["torch_dtype"] = cfg.pop("dtype")
    (src / "config.json").write_text(json.dumps(cfg))
    meta = hf_import.import_hf(str(src), str(tmp_path / "ckpt"), lr_min=1e-5)
    assert meta["model"] == checkpoint.read_metadata(zoo.ckpt(family))["model"]


def test_check_command(zoo, capsys):
    args = ["check", "--model_dir", zoo.hf("mistral"), "--checkpoint", zoo.ckpt("mistral"), "--seq_len", "16"]
    assert hf.main(args) == 0
    out = capsys.readouterr().out
    assert "max |diff|" in out and "max relative" in out and "ok" in out
    assert hf.main([*args, "--atol", "1e-12"]) == 1
    assert "EXCEEDED" in capsys.readouterr().out


# ============================================================================ export


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_then_export_is_bit_identical(zoo, family, tmp_path):
    spec, out = FAMILIES[family], str(tmp_path / "exported")
    # Small shards for llama: the export writes an index too. No dtype: the import's is kept.
    r = hf_export.export_hf(zoo.ckpt(family), out, max_shard_bytes=60_000 if family == "llama" else 10**9)
    assert r == {"architecture": spec["cls"], "dtype": spec["dtype"], "dtype_reason": "the dtype it was imported in"}
    names = sorted(os.listdir(out))
    if family == "llama":
        assert hf_import.INDEX_FILE in names and sum(n.endswith(".safetensors") for n in names) > 1
        index = json.loads(open(os.path.join(out, hf_import.INDEX_FILE)).read())
        assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    else:
        assert hf_import.SINGLE_FILE in names and hf_import.INDEX_FILE not in names
    assert "config.json" in names and "generation_config.json" in names
    assert ("tokenizer.json" if spec["tokenizer"] == "hf" else "tokenizer.model") in names

    original, exported = safetensors_of(zoo.hf(family)), safetensors_of(out)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].shape == tensor.shape, name
        assert torch.equal(exported[name], tensor), name

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert type(loaded).__name__ == spec["cls"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(zoo.hf(family), dtype=torch.float32)
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, (2, 40)))
    with torch.no_grad():
        # Same weights and an equivalent config.json (rope scaling, sliding window): same logits.
        np.testing.assert_array_equal(loaded(input_ids=tokens).logits.numpy(),
                                      reference(input_ids=tokens).logits.numpy())


def test_a_moved_import_exports_its_own_tokenizer(zoo, tmp_path):
    moved = shutil.copytree(zoo.ckpt("qwen2"), tmp_path / "moved")
    meta = checkpoint.read_metadata(str(moved))
    assert not meta["tokenizer"].startswith(str(moved))  # the metadata still names the old place
    out = tmp_path / "exported"
    hf_export.export_hf(str(moved), str(out), dtype="bfloat16")
    assert file_sha256(out / "tokenizer.json") == meta["tokenizer_fingerprint"]
    assert os.path.isfile(out / "tokenizer_config.json")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert _cpt_hf_config(str(moved)).data.tokenizer == str(moved / "tokenizer" / "tokenizer.json")


def test_export_command_keeps_the_imported_dtype_unless_told(zoo, tmp_path, capsys):
    step_dir = os.path.join(zoo.ckpt("llama"), "checkpoints", "0")
    kept, told = str(tmp_path / "kept"), str(tmp_path / "told")
    assert hf.main(["export", "--checkpoint", step_dir, "--out", kept]) == 0
    assert capsys.readouterr().out.strip().endswith("as LlamaForCausalLM in float32 (the dtype it was imported in)")
    assert {t.dtype for t in safetensors_of(kept).values()} == {torch.float32}  # a float32 import is not rounded
    assert hf.main(["export", "--checkpoint", step_dir, "--out", told, "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().endswith("in bfloat16 (--dtype)")
    assert {t.dtype for t in safetensors_of(told).values()} == {torch.bfloat16}
    cfg = json.loads(open(os.path.join(told, "config.json")).read())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["max_position_embeddings"] == 256
    _, info = transformers.AutoModelForCausalLM.from_pretrained(told, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _own_checkpoint(directory, mc, **meta):
    params = model.init_params(mc, 0)
    hf_import.write_checkpoint(str(directory), params, {
        "step": 0, "model": mc.to_dict(), "param_shapes": checkpoint.param_shapes(params), "lr_min": 1e-5, **meta})
    return str(directory)


def test_export_dtype_of_a_model_cpt_jax_trained_and_of_a_continued_import(zoo, tmp_path):
    # Trained from scratch by cpt_jax: its float32 master weights.
    mc = model.ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=32)
    r = hf_export.export_hf(_own_checkpoint(tmp_path / "own", mc), str(tmp_path / "own_hf"))
    assert (r["dtype"], r["dtype_reason"]) == ("float32", "trained by cpt_jax; --dtype bfloat16 halves the size")
    assert {t.dtype for t in safetensors_of(tmp_path / "own_hf").values()} == {torch.float32}
    # A checkpoint continued from the bf16 Qwen2 import: the import's dtype, found through init_from.
    imported = checkpoint.read_metadata(zoo.ckpt("qwen2"))
    mc = model.ModelConfig.from_config(imported["model"])
    continued = _own_checkpoint(tmp_path / "cpt", mc, init_from=zoo.ckpt("qwen2"))
    r = hf_export.export_hf(continued, str(tmp_path / "cpt_hf"))
    assert r == {"architecture": "Qwen2ForCausalLM", "dtype": "bfloat16",
                 "dtype_reason": "the dtype it was imported in"}
    assert {t.dtype for t in safetensors_of(tmp_path / "cpt_hf").values()} == {torch.bfloat16}


# ============================================================================ continued pretraining


def test_continued_run_starts_at_the_imported_lr_min_and_exports(zoo, tmp_path):
    wd = str(tmp_path / "cpt")
    status = train.main([
        "train", "--config=configs/tiny.py", f"--workdir={wd}", "--config.schedule.name=recipe",
        f"--config.init_from={zoo.ckpt('mistral')}",
        "--config.model.n_layers=2", "--config.model.d_model=64", "--config.model.n_heads=4",
        "--config.model.n_kv_heads=1", "--config.model.d_ff=96", f"--config.model.vocab_size={VOCAB}",
        "--config.model.max_seq_len=48", "--config.model.rope_theta=1000000.0", "--config.model.norm_eps=1e-6",
        "--config.model.dtype=float32", "--config.train.steps=3", "--config.train.log_every_steps=1",
        "--config.tensorboard=False", "--config.train.seq_len=16",
    ])
    assert status == 0
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        first = next(r for r in map(json.loads, f) if r["kind"] == "train")
    assert first["step"] == 0 and first["lr"] == float(np.float32(LR_MIN["mistral"]))

    # The trained checkpoint exports as Mistral with the imported tokenizer: both come from the
    # metadata of the checkpoint it was initialised from; so does the dtype (the import's float32).
    out = str(tmp_path / "exported")
    assert checkpoint.read_metadata(wd)["source_dtype"] == "float32"
    assert hf_export.export_hf(wd, out)["dtype"] == "float32"
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] == 48
    assert file_sha256(os.path.join(out, "tokenizer.model")) == file_sha256(os.path.join(zoo.hf("mistral"),
                                                                                          "tokenizer.model"))
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    decoder, _ = checkpoint_model.load(wd, dtype="float32")
    np.testing.assert_array_equal(loaded.model.embed_tokens.weight.detach().numpy(), np.asarray(decoder.embed[...]))


def _cpt_hf_config(arg):
    """configs/cpt_hf.py's get_config(arg), as `--config configs/cpt_hf.py:ARG` evaluates it."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpt_hf.py")
    spec = importlib.util.spec_from_file_location("cpt_hf_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_cpt_hf_config_reads_the_model_from_the_import(zoo):
    from cpt_jax import config

    ckpt = zoo.ckpt("llama")
    meta = checkpoint.read_metadata(ckpt)
    cfg = _cpt_hf_config(ckpt)
    config.check_keys(cfg)
    for key, value in meta["model"].items():
        if key not in ("dtype", "param_dtype", "init_std", "scan_layers", "remat", "attention"):
            assert cfg.model[key] == value, key
    assert cfg.init_from == ckpt and cfg.data.tokenizer == meta["tokenizer"]
    assert cfg.schedule.name == "recipe" and cfg.schedule.start_lr is None
    config.validate(cfg)
    checkpoint.check_param_shapes(meta["param_shapes"],
                                  model.abstract_params(model.ModelConfig.from_config(cfg.model)), "test")

    cfg = _cpt_hf_config("llama3_8b")
    assert (cfg.model.d_model, cfg.model.n_kv_heads, cfg.model.rope_theta) == (4096, 8, 500000.0)
    assert cfg.schedule.name == "recipe"
    config.validate(cfg)


# ============================================================================ published schedules


def test_published_schedule_table(zoo, tmp_path, monkeypatch):
    llama2_7b = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     intermediate_size=11008, vocab_size=32000)
    known = hf_import.published_schedule(llama2_7b)
    assert (known.lr_max, known.lr_min) == (3e-4, 3e-5) and "Llama 2" in known.reference
    assert hf_import.published_schedule(dict(llama2_7b, num_key_value_heads=8)) is None
    assert hf_import.published_schedule(dict(llama2_7b, model_type="mistral")) is None

    # A model found in the table needs no --lr_min.
    tiny = hf_import.PublishedSchedule("tiny test model", 1e-3, 1e-4, "this test",
                                hf_import._llama_shape(64, 2, 4, 2, 96, VOCAB))
    monkeypatch.setattr(hf_import, "PUBLISHED_SCHEDULES", (tiny,))
    meta = hf_import.import_hf(zoo.hf("llama"), str(tmp_path / "ckpt"))
    assert (meta["lr_min"], meta["lr_max"]) == (1e-4, 1e-3)
    assert meta["schedule"]["source"] == "table" and "this test" in meta["schedule"]["reference"]


# ============================================================================ bad input


def _copy(zoo, family, tmp_path):
    return shutil.copytree(zoo.hf(family), tmp_path / "bad")


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def _unsupported(zoo, tmp_path):
    d = _copy(zoo, "mistral", tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"])
    return d, ["GPT2LMHeadModel is not supported", "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"]


def _missing_shard(zoo, tmp_path):
    d = _copy(zoo, "llama", tmp_path)
    shard = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[1]
    os.remove(d / shard)
    return d, [hf_import.INDEX_FILE, f"shard {shard}", "missing"]


def _wrong_shape(zoo, tmp_path):
    d = _copy(zoo, "mistral", tmp_path)
    _edit_config(d, intermediate_size=80)
    return d, ["tensor model.layers.0.mlp.gate_proj.weight has shape (96, 64)", "config.json implies (80, 64)"]


def _pickle(zoo, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copyfile(os.path.join(zoo.hf("mistral"), "config.json"), d / "config.json")
    torch.save({"model.norm.weight": torch.ones(64)}, d / "pytorch_model.bin")
    return d, ["pytorch_model.bin", "pickle", "save_pretrained", "safe_serialization=True"]


def _big_tokenizer(zoo, tmp_path, hf_path):
    d = _copy(zoo, "mistral", tmp_path)
    os.remove(d / "tokenizer.model")
    shutil.copyfile(hf_path, d / "tokenizer.json")  # 500 tokens
    return d, ["tokenizer.json", "500 tokens exceed the embedding's 320 rows"]


def _llama_attention_bias(zoo, tmp_path):
    d = _copy(zoo, "llama", tmp_path)
    _edit_config(d, attention_bias=True)
    return d, ["attention_bias", "o_proj"]


def _yarn(zoo, tmp_path):
    d = _copy(zoo, "mistral", tmp_path)
    _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    return d, ["rope type 'yarn' is not supported"]


def _qwen3_sliding_window(zoo, tmp_path):
    d = _copy(zoo, "qwen3", tmp_path)
    _edit_config(d, use_sliding_window=True, sliding_window=32, max_window_layers=1,
                 layer_types=["full_attention", "sliding_attention"])
    return d, ["sliding-window attention on layers 1..1", "not implement", "use_sliding_window false"]


def _moe_experts(zoo, tmp_path):
    d = _copy(zoo, "qwen3", tmp_path)
    _edit_config(d, num_experts=8)
    return d, ["num_experts 8", "mixture-of-experts"]


def _moe_architecture(zoo, tmp_path):
    d = _copy(zoo, "qwen3", tmp_path)
    _edit_config(d, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    return d, ["Qwen3MoeForCausalLM is not supported (mixture-of-experts"]


def _nemotron_rope_type(zoo, tmp_path):
    d = _copy(zoo, "nemotron", tmp_path)
    _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4,
                                     "partial_rotary_factor": 0.5})
    return d, ["rope type 'dynamic' is not supported"]


def _nemotron_activation(zoo, tmp_path):
    d = _copy(zoo, "nemotron", tmp_path)
    _edit_config(d, hidden_act="gelu")
    return d, ["hidden_act 'gelu', expected 'relu2'"]


def _olmo2_attention_bias(zoo, tmp_path):
    d = _copy(zoo, "olmo2", tmp_path)
    _edit_config(d, attention_bias=True)
    return d, ["attention_bias", "o_proj"]


BAD_IMPORTS = {
    "unsupported_architecture": _unsupported,
    "missing_shard": _missing_shard,
    "tensor_shape": _wrong_shape,
    "pickle_weights": _pickle,
    "tokenizer_too_big": _big_tokenizer,
    "llama_attention_bias": _llama_attention_bias,
    "rope_type": _yarn,
    "qwen3_sliding_window": _qwen3_sliding_window,
    "moe_experts": _moe_experts,
    "moe_architecture": _moe_architecture,
    "nemotron_rope_type": _nemotron_rope_type,
    "nemotron_activation": _nemotron_activation,
    "olmo2_attention_bias": _olmo2_attention_bias,
}


def _assert_one_line_error(status, capsys, expected):
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, (text, err)


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_bad_import_is_one_line_and_writes_nothing(zoo, tmp_path, capsys, hf_path, case):
    make = BAD_IMPORTS[case]
    directory, expected = make(zoo, tmp_path, hf_path) if case == "tokenizer_too_big" else make(zoo, tmp_path)
    out = tmp_path / "out" / "ckpt"
    status = hf.main(["import", "--model_dir", str(directory), "--out", str(out), "--lr_min", "1e-5"])
    _assert_one_line_error(status, capsys, expected)
    assert not out.exists() and not (tmp_path / "out").exists()


def test_module_entry_point_exits_2_on_bad_input(zoo, tmp_path):
    import subprocess
    import sys

    d, expected = _unsupported(zoo, tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "cpt_jax.hf", "import", "--model_dir", str(d), "--out", str(out),
                        "--lr_min", "1e-5"], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))), env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected[0] in lines[0], r.stderr
    assert not out.exists()


def test_import_without_a_known_schedule_asks_for_lr_min(zoo, tmp_path, capsys):
    out = tmp_path / "ckpt"
    _assert_one_line_error(hf.main(["import", "--model_dir", zoo.hf("qwen2"), "--out", str(out)]), capsys,
                           ["--lr_min: missing", "Qwen2ForCausalLM", "--lr_min X"])
    assert not out.exists()


def test_output_directory_must_be_new_or_empty(zoo, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for args in (["import", "--model_dir", zoo.hf("mistral"), "--lr_min", "1e-5"],
                 ["export", "--checkpoint", zoo.ckpt("mistral")]):
        _assert_one_line_error(hf.main([*args, "--out", str(out)]), capsys, [str(out), "not an empty directory"])
        assert os.listdir(out) == ["keep.txt"]
    # An empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    hf_import.import_hf(zoo.hf("mistral"), str(empty), lr_min=1e-5)
    assert sorted(os.listdir(empty)) == ["checkpoints", "tokenizer"]
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


@pytest.mark.parametrize("change", [{"mlp": "squared_relu"}, {"norm": "layernorm"}])
def test_export_refuses_models_without_a_hf_equivalent(tmp_path, capsys, change):
    mc = model.ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=64,
                           max_seq_len=32, **change)
    out = tmp_path / "exported"
    status = hf.main(["export", "--checkpoint", _own_checkpoint(tmp_path / "mixed", mc), "--out", str(out)])
    _assert_one_line_error(status, capsys, [repr(next(iter(change.values()))), "LlamaForCausalLM"])
    assert not out.exists()


def test_api_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(dict(FAMILIES["llama"]["config"],
                                                                          architectures=["LlamaForCausalLM"])))
        hf_import.import_hf(str(tmp_path / "empty"), str(tmp_path / "out"), lr_min=1e-5)
    with pytest.raises(ConfigError, match="--dtype"):
        hf_export.export_hf(str(tmp_path), str(tmp_path / "out"), dtype="int8")
    assert not (tmp_path / "out").exists()
