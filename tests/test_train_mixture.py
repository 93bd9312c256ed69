"""Training on prepared sources: the General -> QA Blend switch happens at the planned step."""

import json
import math
import os
import shutil

import data_helpers
import pytest

from cpt_jax import checkpoint, config, evaluate, schedules, train
from cpt_jax.data.tokenization import load_tokenizer

STEPS, START_LR = 20, 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    tok = data_helpers.make_sentencepiece(root)
    general = data_helpers.make_prepared_source(root, tok, data_helpers.make_documents(300, seed=5), seq_len=32,
                                                name="general")
    qa = data_helpers.make_prepared_source(root, tok, data_helpers.make_documents(100, seed=6), seq_len=32,
                                           name="qa")
    task = root / "task.jsonl"
    task.write_text("".join(
        json.dumps({"context": f"Question {i}: which word?", "choices": [" alpha", " beta", " gamma"], "gold": i % 3})
        + "\n" for i in range(6)
    ))
    cfg_file = root / "mix.py"
    cfg_file.write_text(f"""
from cpt_jax.presets import preset_config

def get_config():
    c = preset_config("tiny")
    c.model.update(n_layers=2, d_model=64, d_ff=128, vocab_size=320, dtype="float32")
    c.train.update(steps={STEPS}, batch_size=8, seq_len=32, log_every_steps=1)
    c.schedule.name, c.schedule.start_lr = "recipe", {START_LR}
    c.tensorboard = False
    c.data.kind = "mixture"
    c.data.tokenizer = {tok!r}
    c.data.sources.general = {general!r}
    c.data.sources.qa = {qa!r}
    c.data.phases = (
        dict(weights=dict(general=1.0, qa=0.0)),
        dict(weights=dict(general=0.5, qa=0.5), start_at=dict(lr_ratio=0.2)),
    )
    c.eval.examples_per_source = 4
    c.eval.batch_size = 8
    c.eval.sources.forgetting = {general!r}
    c.eval.tasks.toy = {str(task)!r}
    return c
""")
    shard = os.path.join(general, json.load(open(os.path.join(general, "manifest.json")))["shards"][0])
    return {"config": str(cfg_file), "tokenizer": tok, "general_shard": shard, "task": str(task)}


def test_switch_at_the_lr_crossing(data, tmp_path):
    workdir = str(tmp_path / "run")
    assert train.main(["train", f"--config={data['config']}", f"--workdir={workdir}"]) == 0
    cfg = config.default_config()
    cfg.schedule.name = "recipe"
    switch = schedules.build(cfg.schedule, STEPS, START_LR).crossing_step(0.2 * START_LR)
    assert switch == 15  # ceil(0.7113 * 20)
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    plan = next(r for r in recs if r["kind"] == "plan")
    assert [p["start_step"] for p in plan["phases"]] == [0, switch]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["phase"] for r in train_recs] == [0] * switch + [1] * (STEPS - switch)
    qa_tokens = [r["tokens_per_source"]["qa"] for r in train_recs]
    assert qa_tokens[switch - 1] == 0 and qa_tokens[switch] > 0
    assert train_recs[-1]["tokens_per_source"]["general"] + qa_tokens[-1] == STEPS * 8 * 32
    meta = checkpoint.read_metadata(os.path.join(workdir, "checkpoints"))
    assert meta["tokenizer_fingerprint"] == load_tokenizer(data["tokenizer"]).fingerprint


def test_source_from_another_tokenizer_is_refused(data, tmp_path, capsys):
    other_tok = data_helpers.make_sentencepiece(tmp_path, vocab_size=300)
    other = data_helpers.make_prepared_source(tmp_path, other_tok, seq_len=32, name="other")
    capsys.readouterr()
    status = train.main(["train", f"--config={data['config']}", f"--workdir={tmp_path / 'never'}",
                         f"--config.data.sources.qa={other}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "fingerprint" in err[0], err
    assert not os.path.exists(tmp_path / "never")


def test_in_loop_evaluation_records(data, tmp_path):
    workdir = str(tmp_path / "run")
    argv = ["train", f"--config={data['config']}", f"--workdir={workdir}", "--config.eval.every_steps=10"]
    assert train.main([*argv, "--config.train.stop_at=10"]) == 0
    assert train.main(argv) == 0  # resumed from step 10: its evaluation is kept, not redone
    evals = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert set(r["sources"]) == {"general", "qa", "forgetting"}
        for m in r["sources"].values():
            assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6) and m["bits_per_byte"] > 0
        assert r["tasks"]["toy"]["n"] == 6
    # The eval-only source reads the same val examples as 'general': the same numbers.
    assert evals[0]["sources"]["forgetting"] == evals[0]["sources"]["general"]
    # The task's scores are those `python -m cpt_jax.evaluate` gives the checkpoint of that step.
    out = str(tmp_path / "eval.json")
    assert evaluate.main(["--checkpoint", os.path.join(workdir, "checkpoints"), "--tasks", f"toy={data['task']}",
                          "--out", out]) == 0
    offline = json.load(open(out))["tasks"]["toy"]
    assert {k: offline[k] for k in ("acc", "acc_norm", "n")} == evals[-1]["tasks"]["toy"], (offline, evals[-1])


def _tree(path):
    return {os.path.join(root, f): open(os.path.join(root, f), "rb").read() for root, _, files in os.walk(path)
            for f in files}


def test_iterator_state_is_checked_on_resume_and_a_damaged_shard_stops_the_run(data, tmp_path, capsys):
    """Every checkpoint carries grain's iterator state, which a resume checks against the step; a
    shard found damaged at its first read stops the run with one line, the last checkpoint intact."""
    general = str(tmp_path / "general")
    shutil.copytree(os.path.dirname(data["general_shard"]), general)
    workdir = str(tmp_path / "run")
    argv = ["train", f"--config={data['config']}", f"--workdir={workdir}", f"--config.data.sources.general={general}",
            "--config.checkpoint.every_steps=10"]
    assert train.main([*argv, "--config.train.stop_at=10"]) == 0
    state_file = os.path.join(workdir, "checkpoints", "10", "data", "process_0-of-1.json")
    state = json.load(open(state_file))
    assert (state["step"], state["start_step"], state["grain"]) == (10, 0, {"next_index": 10})
    before = _tree(workdir)

    json.dump(dict(state, step=9), open(state_file, "w"))
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {state_file}: the data iterator's state is at step 9, expected step 10 (the "
                       "checkpoint's step); the checkpoint is inconsistent, resume from an earlier step or move this "
                       "one away"), err
    json.dump(state, open(state_file, "w"), indent=1)

    # Garbage over most records of the file's first block (64 KiB), its index at the end intact:
    # opening the file still works, reading those records does not.
    shard = os.path.join(general, os.path.basename(data["general_shard"]))
    start = os.path.getsize(shard) // 10
    with open(shard, "r+b") as f:
        f.seek(start)
        f.write(b"\xa5" * (65_000 - start))
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {shard}: record ") and "unreadable" in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [10]
    after = _tree(workdir)
    assert {k: v for k, v in after.items() if "checkpoints" in k} == {k: v for k, v in before.items()
                                                                        if "checkpoints" in k}
