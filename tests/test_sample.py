"""python -m cpt_jax.sample: greedy decoding of imported models matches transformers' generate token
for token, sampling is seeded, bad input is one line (exit 2); eval.sample_prompts in the eval record."""

import json
import os
import re

import pytest

from cpt_jax import checkpoint, hf_import, model, sample
from cpt_jax.config import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hf_helpers import VOCAB  # noqa: E402

PROMPTS = ["the model reads data and", "a", "continued pretraining starts from a checkpoint with a small"]


def _sample(capsys, *args):
    status = sample.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("family", ["qwen3", "nemotron"])
def test_greedy_decoding_matches_transformers_generate(zoo, capsys, family):
    ckpt = zoo.ckpt(family)
    args = ["--checkpoint", ckpt, "--max_new_tokens", "24", "--dtype", "float32", "--json"]
    status, out, _ = _sample(capsys, *args, *[a for p in PROMPTS for a in ("--prompt", p)])
    assert status == 0
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["prompt"] for g in got] == PROMPTS

    from cpt_jax.data.tokenization import load_tokenizer, resolve_bos

    tok = load_tokenizer(checkpoint.read_metadata(ckpt)["tokenizer"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(zoo.hf(family), dtype=torch.float32).eval()
    bos = [tok.bos_id] if resolve_bos("auto", tok) else []  # --bos auto on an import: the tokenizer's convention
    for text, g in zip(PROMPTS, got, strict=True):
        ids = bos + [int(t) for t in tok.encode_batch([text])[0]]
        with torch.no_grad():
            seq = reference.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
                suppress_tokens=list(range(tok.vocab_size, VOCAB)),  # ids the tokenizer cannot decode
            )[0, len(ids):].tolist()
        assert g["tokens"] == seq, (text, g["tokens"], seq)
        assert g["stopped"] == ("eos" if seq[-1] == tok.eos_id else "length")
        assert g["continuation"] == tok.decode(seq[:-1] if g["stopped"] == "eos" else seq)


def test_sampling_is_seeded_and_text_output_shows_each_prompt(zoo, capsys):
    common = ["--checkpoint", zoo.ckpt("qwen3"), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
              "--max_new_tokens", "12", "--temperature", "1.0", "--top_p", "0.9"]
    runs = [[json.loads(line) for line in _sample(capsys, *common, "--seed", seed, "--json")[1].splitlines()]
            for seed in ("1", "1", "2")]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    status, out, _ = _sample(capsys, *common, "--seed", "1")
    assert status == 0
    assert out == (f"--- prompt 1 ({len(runs[0][0]['tokens'])} new tokens, stopped at {runs[0][0]['stopped']})\n"
                   f"{PROMPTS[0]}{runs[0][0]['continuation']}\n\n"
                   f"--- prompt 2 ({len(runs[0][1]['tokens'])} new tokens, stopped at {runs[0][1]['stopped']})\n"
                   f"{PROMPTS[1]}{runs[0][1]['continuation']}\n")


def test_prompts_start_with_bos_as_the_checkpoint_was_trained_unless_told(zoo, capsys, monkeypatch):
    from cpt_jax import decode
    from cpt_jax.data.tokenization import load_tokenizer, resolve_bos

    ckpt = zoo.ckpt("nemotron")  # a sentencepiece tokenizer with a BOS token
    tok = load_tokenizer(checkpoint.read_metadata(ckpt)["tokenizer"])
    seen = []
    real = decode.prompt_tokens
    monkeypatch.setattr(decode, "prompt_tokens", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for choice in ("auto", "always", "never"):
        status, _, err = _sample(capsys, "--checkpoint", ckpt, "--prompt", PROMPTS[0], "--max_new_tokens", "2",
                                 "--bos", choice)
        assert status == 0, err
    plain = [int(t) for t in tok.encode_batch([PROMPTS[0]])[0]]
    auto, always, never = (ids[0] for ids in seen)
    assert always == [tok.bos_id, *plain] and never == plain
    # An import has no data sources of its own: auto follows the tokenizer's convention, as prepare's.
    assert auto == (always if resolve_bos("auto", tok) else never)


_TINY = model.ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=32)


def _own_checkpoint_without_tokenizer(tmp_path):
    mc = _TINY
    params = model.init_params(mc, 0)
    hf_import.write_checkpoint(str(tmp_path / "own"), params, {
        "step": 0, "model": mc.to_dict(), "param_shapes": checkpoint.param_shapes(params), "lr_min": 1e-5})
    return str(tmp_path / "own")


def _checkpoint_without_model(tmp_path):
    hf_import.write_checkpoint(str(tmp_path / "nomodel"), {"w": model.init_params(_TINY, 0)["embed"]}, {"step": 0})
    return str(tmp_path / "nomodel")


BAD = [
    ("beyond max_seq_len", lambda z, t: ["--checkpoint", z.ckpt("qwen3"), "--prompt", "a", "--max_new_tokens", "500"],
     "--max_new_tokens: 500 after the "),
    ("prompt filling max_seq_len", lambda z, t: ["--checkpoint", z.ckpt("qwen3"), "--prompt", "a", "--prompt",
                                                 "data and " * 600],  # no --max_new_tokens: none fits
     "--prompt 2: "),
    ("empty prompt", lambda z, t: ["--checkpoint", z.ckpt("qwen3"), "--prompt", "data", "--prompt", ""],
     "--prompt 2 (''): tokenizes to no tokens"),
    ("no tokenizer", lambda z, t: ["--checkpoint", _own_checkpoint_without_tokenizer(t), "--prompt", "a"],
     "names no tokenizer found on disk, expected --tokenizer FILE"),
    ("bos always without a bos token", lambda z, t: ["--checkpoint", z.ckpt("qwen3"), "--prompt", "a", "--bos",
                                                     "always"], "--bos always: tokenizer "),
    ("negative temperature", lambda z, t: ["--checkpoint", z.ckpt("qwen3"), "--prompt", "a", "--temperature", "-1"],
     "--temperature: -1.0"),
    ("top_p of 0", lambda z, t: ["--checkpoint", z.ckpt("qwen3"), "--prompt", "a", "--top_p", "0"], "--top_p: 0.0"),
    ("no checkpoint", lambda z, t: ["--checkpoint", str(t / "nothing"), "--prompt", "a"], "does not exist"),
    ("no model config", lambda z, t: ["--checkpoint", _checkpoint_without_model(t), "--prompt", "a"],
     "metadata without a model config, expected a cpt_jax checkpoint"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line(zoo, tmp_path, capsys, case):
    _, build, expected = case
    args = build(zoo, tmp_path)
    ckpt = args[args.index("--checkpoint") + 1]
    before = sorted(os.walk(ckpt)) if os.path.exists(ckpt) else None
    status, out, err = _sample(capsys, *args)
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    if case[0] == "prompt filling max_seq_len":
        assert re.fullmatch(r"error: --prompt 2: (\d+) tokens, too long for the model's max_seq_len (\d+), expected "
                            r"at most (\d+) to leave room for a new token", lines[0]), lines[0]
        assert "--max_new_tokens" not in lines[0]  # never passed
    assert (sorted(os.walk(ckpt)) if os.path.exists(ckpt) else None) == before


def test_eval_sample_prompts_go_into_the_eval_record_and_tensorboard(tmp_path, sp_path):
    """What a run does at each evaluation (train.py calls Evaluation.run, then MetricsWriter.write)."""
    import jax

    from cpt_jax import config, sharding
    from cpt_jax.evaluation import from_config
    from cpt_jax.metrics import MetricsWriter

    cfg = config.default_config()
    cfg.model.update(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=320, max_seq_len=64)
    cfg.data.tokenizer = sp_path
    cfg.eval.every_steps = 2
    cfg.eval.sample_prompts = ("the model", "data and")
    cfg.eval.sample_max_new_tokens = 5
    mc = model.ModelConfig.from_config(cfg.model)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
    params = jax.device_put(model.init_params(mc, 0), sharding.param_shardings(
        model.abstract_params(mc), model.logical_axes(mc), mesh, rules))
    evaluation = from_config(cfg, mc, mesh=mesh, rules=rules)
    record = evaluation.run(params, 2)
    assert [s["prompt"] for s in record["samples"]] == ["the model", "data and"]
    assert all(isinstance(s["continuation"], str) for s in record["samples"])
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    writer.write(record)
    writer.close()
    assert json.loads(open(tmp_path / "metrics.jsonl").read())["samples"] == record["samples"]
    events = b"".join(open(os.path.join(tmp_path, "tb", n), "rb").read() for n in os.listdir(tmp_path / "tb"))
    assert b"eval/samples" in events and b"**prompt 2**" in events  # a text summary: TensorBoard's text tab

    cfg.data.tokenizer = ""
    with pytest.raises(ConfigError, match=r"^eval.sample_prompts: no tokenizer"):
        from_config(cfg, mc, mesh=mesh, rules=rules)
