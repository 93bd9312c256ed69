"""Evaluation: per-source loss/perplexity/bits per byte against a direct computation, sharding and
padding invariance, multiple-choice accuracy of a trained vs an untrained model, the trainer's
entry point, and the command line end to end."""

import dataclasses
import json
import math
import os
import random
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from data_helpers import make_prepared_source

from cpt_jax import checkpoint_model, config, evaluate, model, scoring, sharding
from cpt_jax.config import ConfigError
from cpt_jax.data import sources
from cpt_jax.data.tokenization import load_tokenizer
from cpt_jax.evaluation import eval_record, from_config

C = model.ModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=320, max_seq_len=64,
                      dtype="float32", scan_layers=False)
TEMPLATE = "Question: {context}\nAnswer:"
# Unrolled layers compile faster than lax.scan (most of these tests' time is XLA compilation); the
# reference forward pass is jitted (one compilation per shape instead of one per op and shape).
apply = jax.jit(model.apply, static_argnums=(2,))
KEYS = ["model", "data", "token", "document", "checkpoint", "rate", "text", "numbers"]
ANSWERS = ["reads", "learns", "predict", "sees", "starts", "small", "new", "quotes"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, sp_path):
    """Two prepared sources (seq_len 16 with 5 val examples; seq_len 8 with 3) and a tiny model."""
    d = tmp_path_factory.mktemp("eval_data")
    a = make_prepared_source(d, sp_path, seq_len=16, val_examples=5, name="a")
    b = make_prepared_source(d, sp_path, seq_len=8, val_examples=3, name="b")
    return {"a": a, "b": b, "params": model.init_params(C, 0), "dir": d}


def direct_nll(params, directory, n):
    """(summed NLL, tokens, bytes_per_token) of the first n val examples via model.apply + numpy
    (the forward pass runs over the whole val split: one shape per source)."""
    src = sources.load_source(directory, "val")
    ex = np.stack([src.dataset[i] for i in range(src.num_examples)]).astype(np.int32)
    inputs, targets = ex[:, :-1], ex[:, 1:]
    seg, pos = sources.segment_ids_and_positions(inputs, src.manifest["eos_id"])
    logits = np.asarray(apply(params, jnp.asarray(inputs), C, jnp.asarray(seg), jnp.asarray(pos)), np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0][:n]
    return nll.sum(), nll.size, src.manifest["bytes_per_token"]


def test_source_metrics_equal_a_direct_computation(data):
    ev = scoring.SourceEvaluator({"a": data["a"]}, C, examples_per_source=4, batch_size=2, seq_len=16)
    logs = []
    r = ev.evaluate(data["params"], log=logs.append)["a"]
    nll, tokens, bpt = direct_nll(data["params"], data["a"], 4)
    assert r["tokens"] == tokens == 4 * 16
    assert r["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * tokens / math.log(2) / (tokens * bpt), rel=1e-12)
    assert len(logs) == 1 and logs[0].startswith("eval source a: loss ")
    # The same examples every time: a second evaluation gives the same numbers.
    assert ev.evaluate(data["params"])["a"] == r


def test_padding_of_the_last_batch_does_not_change_results(data):
    # 5 examples in batches of 2: the last batch holds one example and one padding row.
    ev = scoring.SourceEvaluator({"a": data["a"]}, C, examples_per_source=5, batch_size=2, seq_len=16)
    assert ev.sets["a"].arrays["inputs"].shape == (6, 16) and ev.sets["a"].arrays["loss_mask"][5].sum() == 0
    r = ev.evaluate(data["params"])["a"]
    nll, tokens, _ = direct_nll(data["params"], data["a"], 5)
    assert r["tokens"] == tokens == 5 * 16
    assert r["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    # More examples asked for than the val split holds: all of them.
    ev = scoring.SourceEvaluator({"a": data["a"]}, C, examples_per_source=100, batch_size=2, seq_len=16)
    assert ev.evaluate(data["params"])["a"] == r


def test_a_shorter_source_is_padded_to_the_eval_length(data):
    # Source b was prepared with seq_len 8; evaluated at 16, its extra columns are masked out.
    ev = scoring.SourceEvaluator({"b": data["b"]}, C, examples_per_source=3, batch_size=2, seq_len=16)
    r = ev.evaluate(data["params"])["b"]
    nll, tokens, _ = direct_nll(data["params"], data["b"], 3)
    assert r["tokens"] == tokens == 3 * 8
    assert r["loss"] == pytest.approx(nll / tokens, rel=1e-5)


def test_one_compiled_step_serves_every_source_and_evaluation(data):
    ev = scoring.SourceEvaluator({"a": data["a"], "b": data["b"]}, C, examples_per_source=3, batch_size=2,
                                  seq_len=16)
    scoring._row_nll_step.cache_clear()
    first = ev.evaluate(data["params"])
    second = ev.evaluate(data["params"])
    assert first == second and set(first) == {"a", "b"}
    assert ev.scorer.step(16)._cache_size() == 1


def _sharded_setup():
    cfg = config.default_config()  # mesh: data 1, fsdp -1 (all 8 devices), tensor 1
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    shardings = sharding.param_shardings(model.abstract_params(C), model.logical_axes(C), mesh, rules)
    return mesh, rules, shardings


def test_sharded_over_8_devices_equals_no_mesh(data, sp_path, tmp_path):
    assert jax.device_count() == 8
    mesh, rules, shardings = _sharded_setup()
    params = jax.device_put(data["params"], shardings)
    assert params["layers"]["wq"].sharding.spec[1] == "fsdp"
    srcs = {"a": data["a"], "b": data["b"]}
    # Batches of 8 rows of 64 tokens (3 and 5 padding rows, padded columns): the shape of the task
    # batches below, so one program serves both.
    sharded = scoring.SourceEvaluator(srcs, C, examples_per_source=5, batch_size=8, seq_len=64, mesh=mesh,
                                          rules=rules)
    plain = scoring.SourceEvaluator(srcs, C, examples_per_source=5, batch_size=2, seq_len=16)
    rs, rp = sharded.evaluate(params), plain.evaluate(data["params"])
    for name in srcs:
        assert rs[name]["tokens"] == rp[name]["tokens"]
        for key in ("loss", "perplexity", "bits_per_byte"):
            assert rs[name][key] == pytest.approx(rp[name][key], rel=1e-5)
    task = write_mc_task(tmp_path / "mc.jsonl", 16)
    t_sharded = scoring.TaskEvaluator({"mc": task}, sp_path, C, seq_len=64, batch_size=8, mesh=mesh, rules=rules)
    t_plain = scoring.TaskEvaluator({"mc": task}, sp_path, C, seq_len=64, batch_size=8)
    for x, y in zip(t_sharded.loglikelihoods(params, "mc"), t_plain.loglikelihoods(data["params"], "mc"), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)


def test_source_errors(data, tmp_path, sp_path):
    def build(srcs, c=C, **kw):
        kw = {"examples_per_source": 2, "batch_size": 2, "seq_len": 16, **kw}
        return scoring.SourceEvaluator(srcs, c, **kw)

    with pytest.raises(ConfigError, match=r"manifest.json: seq_len 16, expected at most the eval seq_len 8"):
        build({"a": data["a"]}, seq_len=8)
    with pytest.raises(ConfigError, match=r"vocab_size 320, expected at most the model's vocab_size 300"):
        build({"a": data["a"]}, c=dataclasses.replace(C, vocab_size=300))
    with pytest.raises(ConfigError, match=r"tokenizer_fingerprint .* expected 0000000000000000\.\.\. of the model"):
        build({"a": data["a"]}, tokenizer_fingerprint="0" * 64)
    with pytest.raises(ConfigError, match=r"eval seq_len: 128, expected at most model.max_seq_len 64"):
        build({"a": data["a"]}, seq_len=128)
    with pytest.raises(ConfigError, match=r"eval.examples_per_source: 0, expected a positive integer"):
        build({"a": data["a"]}, examples_per_source=0)
    with pytest.raises(ConfigError, match=r"manifest.json: missing, expected a directory made by"):
        build({"x": str(tmp_path / "nowhere")})
    no_val = make_prepared_source(tmp_path, sp_path, seq_len=16, val_examples=0, name="noval")
    with pytest.raises(ConfigError, match=r"0 val examples, expected a non-empty source"):
        build({"n": no_val})
    mesh, rules, _ = _sharded_setup()
    with pytest.raises(ConfigError, match=r"eval.batch_size: 6, expected a multiple of the 8 devices"):
        build({"a": data["a"]}, batch_size=6, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------ tasks


def write_mc_task(path, n, seed=0):
    """n questions 'which word goes with KEY?'; the gold is KEY's fixed partner among 4 of ANSWERS."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = i % len(KEYS)
            choices = rng.sample([a for a in ANSWERS if a != ANSWERS[k]], 3) + [ANSWERS[k]]
            rng.shuffle(choices)
            f.write(json.dumps({"context": f"which word goes with {KEYS[k]}?", "choices": choices,
                                "gold": choices.index(ANSWERS[k])}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def mc(tmp_path_factory, sp_path):
    """A 48-question task, and a tiny model trained with plain optax on its contexts + gold answers."""
    from cpt_jax import tasks

    path = write_mc_task(tmp_path_factory.mktemp("mc") / "mc.jsonl", 48)
    task = tasks.load_task(path, template=TEMPLATE)
    texts = sorted({prompt + conts[ex.gold] for (prompt, conts), ex in zip(task.requests(), task.examples,
                                                                          strict=True)})
    ids = load_tokenizer(sp_path).encode_batch(texts)
    length = max(len(x) for x in ids)
    toks = np.zeros((len(ids), length), np.int32)
    mask = np.zeros((len(ids), length - 1), np.float32)
    for i, x in enumerate(ids):
        toks[i, :len(x)], mask[i, :len(x) - 1] = x, 1.0
    tx = optax.adam(1e-2)

    def loss_fn(p):
        logp = jax.nn.log_softmax(model.apply(p, toks[:, :-1], C))  # traced once inside the jitted step
        nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
        return (nll * mask).sum() / mask.sum()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    params = model.init_params(C, 0)
    state = tx.init(params)
    for _ in range(90):
        params, state, loss = step(params, state)
    assert float(loss) < 0.3, float(loss)
    return {"path": path, "trained": params}


def test_trained_model_answers_and_untrained_is_at_chance(mc, sp_path):
    ev = scoring.TaskEvaluator({"mc": {"path": mc["path"], "template": TEMPLATE}}, sp_path, C, seq_len=64,
                                batch_size=8)
    logs = []
    trained = ev.evaluate(mc["trained"], log=logs.append)["mc"]
    assert trained["n"] == 48 and trained["acc"] >= 0.9 and trained["acc_norm"] >= 0.9, trained
    assert logs[0].startswith("eval task mc: acc ")
    for seed in (0, 1):
        untrained = ev.evaluate(model.init_params(C, seed))["mc"]
        assert abs(untrained["acc"] - 0.25) <= 0.2, untrained
    # One length bucket for the whole task: the longest row rounded up to a power of two.
    longest = int(ev.sets["mc"].lengths.max()) - 1  # positions scored: the row's tokens but the last
    assert ev.sets["mc"].length == max(16, 1 << (longest - 1).bit_length()) >= longest  # 16: the shortest bucket


def test_choice_loglikelihood_equals_a_direct_computation(mc, sp_path):
    tok = load_tokenizer(sp_path)
    for seq_len in (64, 8):  # 8: the context is truncated from the left
        ev = scoring.TaskEvaluator({"mc": {"path": mc["path"], "template": TEMPLATE}}, tok, C, seq_len=seq_len,
                                    batch_size=8)
        ll = ev.loglikelihoods(mc["trained"], "mc")
        task = ev.sets["mc"].task
        seqs, expected = [], []
        for q in (0, 5):
            prompt, conts = task.requests()[q]
            k = len(tok.encode_batch([prompt])[0])
            for j, cont in enumerate(conts):
                whole = tok.encode_batch([prompt + cont])[0].astype(np.int32)
                seqs.append((whole[-(seq_len + 1):], len(whole) - k))
                expected.append(ll[q][j])
        # One direct forward pass over all of them, right-padded (causal: padding changes nothing before it).
        tokens = np.zeros((len(seqs), 65), np.int32)
        for i, (s, _) in enumerate(seqs):
            tokens[i, :len(s)] = s
        logits = np.asarray(apply(mc["trained"], jnp.asarray(tokens[:, :-1]), C), np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        for i, (s, n_choice) in enumerate(seqs):
            per_token = np.take_along_axis(logp[i, :len(s) - 1], s[1:, None], -1)[:, 0]
            assert expected[i] == pytest.approx(per_token[-n_choice:].sum(), rel=1e-5, abs=1e-5)
        if seq_len == 8:
            assert ev.sets["mc"].truncated == ev.sets["mc"].rows and ev.sets["mc"].length == 8


def test_acc_and_acc_norm_differ_when_choice_lengths_differ(tmp_path, sp_path):
    assert scoring.choice_metrics([[-5.0, -8.0]], [[2, 9]], [1]) == (0.0, 1.0)
    assert scoring.choice_metrics([[-5.0, -8.0]], [[2, 9]], [0]) == (1.0, 0.0)
    assert scoring.choice_metrics([[-1.0, -1.0]], [[3, 3]], [0]) == (1.0, 1.0)  # ties: the first choice
    # A near-uniform untrained model: a short choice has the higher sum, a long one the higher per byte.
    path = tmp_path / "len.jsonl"
    rows = [{"context": f"doc {i}: " + "the data " * 8, "gold": 1,
             "choices": [" x", " model reads data and learns to predict the next"]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = scoring.TaskEvaluator({"len": str(path)}, sp_path, C, seq_len=64, batch_size=8)
    r = ev.evaluate(model.init_params(C, 0))["len"]
    assert r == {"acc": 0.0, "acc_norm": 1.0, "n": 4}


def test_fewshot_prompts_are_scored_and_task_errors(mc, sp_path, tmp_path):
    spec = {"path": mc["path"], "template": TEMPLATE, "fewshot": 3, "seed": 1}
    ev = scoring.TaskEvaluator({"mc": spec}, sp_path, C, seq_len=64, batch_size=8)
    assert ev.sets["mc"].task.prompt(ev.sets["mc"].task.examples[0]).count("Question:") == 4
    r = ev.evaluate(mc["trained"])["mc"]
    # 45 questions (3 went to the shots), 4 choices: chance is 0.25 (11 of 45); the trained model
    # answers 30 (acc_norm 28) with the shots in front on this machine, far above what chance reaches.
    assert r["n"] == 45 and r["acc"] >= 0.5 and r["acc_norm"] >= 0.5, r
    assert (r["acc"] * 45).is_integer() and (r["acc_norm"] * 45).is_integer(), r
    with pytest.raises(ConfigError, match=r"tokenizer .*: 320 tokens, expected at most the model's vocab_size 100"):
        scoring.TaskEvaluator({"mc": mc["path"]}, sp_path, dataclasses.replace(C, vocab_size=100), seq_len=64,
                               batch_size=8)
    with pytest.raises(ConfigError, match=r"mc.jsonl: no such file"):
        scoring.TaskEvaluator({"mc": str(tmp_path / "mc.jsonl")}, sp_path, C, seq_len=64, batch_size=8)
    with pytest.raises(ConfigError, match=r"eval.tasks.mc: unknown key 'shots'"):
        scoring.TaskEvaluator({"mc": {"path": mc["path"], "shots": 2}}, sp_path, C, seq_len=64, batch_size=8)


# ------------------------------------------------------------------------------------ records, trainer


def test_eval_record_is_the_metrics_record():
    sources_result = {"web": {"loss": np.float32(2.0), "perplexity": math.exp(2.0), "bits_per_byte": 0.5,
                              "tokens": 64}}
    tasks_result = {"mc": {"acc": 0.75, "acc_norm": 0.5, "n": np.int64(4)}}
    record = eval_record(np.int32(10), sources_result, tasks_result)
    assert record == {
        "kind": "eval",
        "step": 10,
        "sources": {"web": {"loss": 2.0, "perplexity": math.exp(2.0), "bits_per_byte": 0.5}},
        "tasks": {"mc": {"acc": 0.75, "acc_norm": 0.5, "n": 4}},
    }
    json.dumps(record)  # plain Python types only
    assert eval_record(3, {}, None) == {"kind": "eval", "step": 3, "sources": {}, "tasks": {}}


def test_from_config_builds_the_run_evaluation(data, mc, sp_path):
    cfg = config.default_config()
    cfg.model.update(**{k: v for k, v in C.to_dict().items() if k in cfg.model})
    cfg.train.seq_len = 64  # the task's rows fit whole; source a (seq_len 16) is padded
    cfg.data.kind = "mixture"
    cfg.data.tokenizer = sp_path
    cfg.data.sources = ml_collections.ConfigDict({"a": data["a"]})
    cfg.eval.every_steps = 5
    cfg.eval.examples_per_source = 3
    cfg.eval.batch_size = 8  # sources and the task share one compiled [8, 64] step
    cfg.eval.sources = ml_collections.ConfigDict({"old": data["b"]})
    cfg.eval.tasks = ml_collections.ConfigDict({"mc": {"path": mc["path"], "template": TEMPLATE}})
    evaluation = from_config(cfg, C)
    assert evaluation.sources.names == ["a", "old"] and evaluation.tasks.names == ["mc"]
    assert [s for s in range(12) if evaluation.due(s)] == [5, 10]
    record = evaluation.run(mc["trained"], 5)
    assert record["kind"] == "eval" and record["step"] == 5
    assert set(record["sources"]) == {"a", "old"} and record["tasks"]["mc"]["acc"] >= 0.9
    assert record["sources"]["a"]["loss"] == pytest.approx(direct_nll(mc["trained"], data["a"], 3)[0] / 48,
                                                           rel=1e-5)

    cfg.eval.every_steps = 0
    assert from_config(cfg, C) is None
    cfg.eval.every_steps = 5
    cfg.eval.sources = ml_collections.ConfigDict({"a": data["b"]})
    with pytest.raises(ConfigError, match=r"eval.sources.a: also a name in data.sources"):
        from_config(cfg, C)
    cfg.eval.sources = ml_collections.ConfigDict()
    cfg.data.kind, cfg.data.tokenizer = "synthetic", ""
    with pytest.raises(ConfigError, match=r"eval.tasks: no tokenizer .* expected data.tokenizer"):
        from_config(cfg, C)
    cfg.eval.tasks = ml_collections.ConfigDict()
    with pytest.raises(ConfigError, match=r"eval.every_steps: 5 with nothing to evaluate"):
        from_config(cfg, C)


# ------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data, mc, sp_path):
    """A checkpoint of the trained model whose run config names source `a` and the tokenizer."""
    from cpt_jax import checkpoint, hf_import

    d = str(tmp_path_factory.mktemp("ckpt") / "run")
    meta = {"step": 90, "model": C.to_dict(), "param_shapes": checkpoint.param_shapes(mc["trained"]),
            "tokenizer_fingerprint": load_tokenizer(sp_path).fingerprint,
            "config": {"data": {"kind": "mixture", "tokenizer": sp_path,
                                "sources": {"a": data["a"], "gone": str(data["dir"] / "gone")}},
                       "eval": {"examples_per_source": 4}}}
    hf_import.write_checkpoint(d, jax.device_get(mc["trained"]), meta)
    return d


def test_cli_end_to_end_writes_the_results(ckpt, data, mc, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    # --seq_len 64: sources and tasks run as [8, 64] batches, the program of the sharded test above.
    status = evaluate.main(["--checkpoint", ckpt, "--tasks", f"mc={mc['path']}", "--template", TEMPLATE,
                            "--seq_len", "64", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    res = json.loads(out.read_text())
    assert res["checkpoint"] == os.path.abspath(ckpt) and res["step"] == 90
    assert set(res["sources"]) == {"a"}  # default: the run's sources found on disk ('gone' is not)
    direct = scoring.SourceEvaluator({"a": data["a"]}, C, examples_per_source=4, batch_size=2, seq_len=16)
    expected = direct.evaluate(mc["trained"])["a"]
    assert res["sources"]["a"]["tokens"] == expected["tokens"] == 4 * 16
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert res["sources"]["a"][key] == pytest.approx(expected[key], rel=1e-5)
    assert res["tasks"]["mc"]["n"] == 48 and res["tasks"]["mc"]["acc"] >= 0.9
    assert "source" in captured.out and "acc_norm" in captured.out and "mc" in captured.out
    err = captured.err
    assert "eval source a:" in err and "eval task mc:" in err and "note: source gone" in err

    # Explicit sources, batch size and examples; tokenizer from --tokenizer.
    status = evaluate.main(["--checkpoint", ckpt, "--sources", f"b={data['b']}", "--examples_per_source", "2",
                            "--batch_size", "8", "--seq_len", "64"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "b " in captured.out and "eval source b:" in captured.err


def test_cli_log_samples_give_every_questions_scores(ckpt, data, mc, sp_path, tmp_path, capsys):
    out = tmp_path / "samples.json"
    status = evaluate.main(["--checkpoint", ckpt, "--tasks", f"mc={mc['path']}", "--template", TEMPLATE,
                            "--seq_len", "64", "--out", str(out), "--log_samples"])
    assert status == 0, capsys.readouterr().err
    res = json.loads(out.read_text())["tasks"]["mc"]
    samples = res["samples"]
    records = [json.loads(line) for line in open(mc["path"])]
    assert len(samples) == res["n"] == len(records)
    # Questions start as the checkpoint's source `a` starts its documents (with BOS: --bos auto).
    assert sources.read_manifest(data["a"])["add_bos"]
    ev = scoring.TaskEvaluator({"mc": {"path": mc["path"], "template": TEMPLATE}}, sp_path, C, seq_len=64,
                                batch_size=8, add_bos=True)
    direct = ev.loglikelihoods(mc["trained"], "mc")
    for i, (q, ll) in enumerate(zip(samples, direct, strict=True)):
        assert q["line"] == i + 1 and q["gold"] == records[i]["gold"]
        assert q["loglikelihoods"] == pytest.approx(list(ll), rel=1e-4, abs=1e-4)
        assert q["pred"] == int(np.argmax(q["loglikelihoods"])) and q["correct"] == (q["pred"] == q["gold"])
    assert sum(q["correct"] for q in samples) / len(samples) == pytest.approx(res["acc"])


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/missing"], r"--checkpoint: .*missing does not exist"),
    (["--checkpoint", "{ckpt}", "--log_samples"], r"--log_samples: no --out, expected --out FILE"),
    (["--checkpoint", "{ckpt}", "--sources", "a"], r"--sources: 'a', expected name=path"),
    (["--checkpoint", "{ckpt}", "--sources", "a={tmp}/x"], r"x/manifest.json: missing"),
    (["--checkpoint", "{ckpt}", "--tasks", "mc={tmp}/none.jsonl"], r"none.jsonl: no such file"),
    (["--checkpoint", "{ckpt}", "--batch_size", "6"], r"--batch_size: 6, expected a multiple of the 8 devices"),
    (["--checkpoint", "{ckpt}", "--batch_size", "0"], r"--batch_size: 0, expected a positive integer"),
    (["--checkpoint", "{ckpt}", "--seq_len", "8"], r"seq_len 16, expected at most the eval seq_len 8"),
    (["--checkpoint", "{ckpt}", "--tasks", "mc={mc}", "--tokenizer", "{tmp}/tok.model"], r"tok.model: no such"),
    (["--checkpoint", "{ckpt}", "--out", "{tmp}"], r"--out .*: a directory"),
])
def test_cli_user_errors_are_one_line(args, message, ckpt, mc, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, ckpt=ckpt, mc=mc["path"]) for a in args]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), err


def test_cli_without_tokenizer_or_anything_to_evaluate(tmp_path, mc, capsys):
    from cpt_jax import checkpoint, hf_import

    d = str(tmp_path / "bare")
    hf_import.write_checkpoint(d, jax.device_get(mc["trained"]),
                        {"step": 0, "model": C.to_dict(), "param_shapes": checkpoint.param_shapes(mc["trained"])})
    assert evaluate.main(["--checkpoint", d]) == 2
    assert "error: --sources/--tasks: nothing to evaluate" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", d, "--tasks", f"mc={mc['path']}"]) == 2
    assert "error: --tokenizer: the checkpoint" in capsys.readouterr().err


def _bos_checkpoint(tmp_path, data, mc, sp_path, add_bos):
    """A checkpoint like `ckpt` whose data source's manifest says documents start (or not) with BOS."""
    import shutil

    from cpt_jax import checkpoint, hf_import

    src = str(tmp_path / f"a_bos_{add_bos}")
    shutil.copytree(data["a"], src)
    path = os.path.join(src, "manifest.json")
    manifest = json.load(open(path))
    json.dump(dict(manifest, bos="always" if add_bos else "never", add_bos=add_bos), open(path, "w"))
    d = str(tmp_path / f"run_bos_{add_bos}")
    meta = {"step": 90, "model": C.to_dict(), "param_shapes": checkpoint.param_shapes(mc["trained"]),
            "config": {"data": {"kind": "mixture", "tokenizer": sp_path, "sources": {"a": src}}}}
    hf_import.write_checkpoint(d, jax.device_get(mc["trained"]), meta)
    return d


def test_cli_poses_questions_as_the_checkpoints_sources_were_prepared(data, mc, sp_path, tmp_path, capsys):
    """--bos auto (the default) puts BOS first exactly when the run's sources start documents with it,
    as the trainer's in-loop evaluation does, so both score a checkpoint alike; always/never override."""
    tok = load_tokenizer(sp_path)
    assert tok.bos_id is not None and tok.bos_id != tok.eos_id
    ev = {bos: scoring.TaskEvaluator({"mc": {"path": mc["path"], "template": TEMPLATE}}, tok, C, seq_len=64,
                                      batch_size=8, add_bos=bos) for bos in (False, True)}
    direct = {bos: ev[bos].loglikelihoods(mc["trained"], "mc") for bos in ev}
    assert not np.allclose(np.concatenate(direct[False]), np.concatenate(direct[True]))
    for add_bos in (False, True):
        ckpt = _bos_checkpoint(tmp_path, data, mc, sp_path, add_bos)
        for flag, expected in (([], add_bos), (["--bos", "always"], True), (["--bos", "never"], False)):
            out = tmp_path / "bos.json"
            status = evaluate.main(["--checkpoint", ckpt, "--tasks", f"mc={mc['path']}", "--template", TEMPLATE,
                                    "--seq_len", "64", "--out", str(out), "--log_samples", *flag])
            assert status == 0, capsys.readouterr().err
            samples = json.loads(out.read_text())["tasks"]["mc"]["samples"]
            for q, ll in zip(samples, direct[expected], strict=True):
                assert q["loglikelihoods"] == pytest.approx(list(ll), rel=1e-4, abs=1e-4), (add_bos, flag)
    # A checkpoint whose sources are gone follows the tokenizer's convention, as prepare --bos auto.
    from cpt_jax.data.tokenization import resolve_bos

    gone = {"config": {"data": {"kind": "mixture", "sources": {"a": str(tmp_path / "gone")}}}}
    assert checkpoint_model.checkpoint_bos(gone, tok) == resolve_bos("auto", tok)
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line, status 2
        evaluate.main(["--checkpoint", ckpt, "--tasks", f"mc={mc['path']}", "--bos", "sometimes"])
    assert exit_info.value.code == 2
