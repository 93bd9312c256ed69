"""The trainer end to end: loss falls, resume continues exactly, init_from starts at lr_min, bad input."""

import json
import os

import numpy as np
import pytest
from train_helpers import SMALL_MODEL

from cpt_jax import flops, model, train

SMALL = [
    *SMALL_MODEL,
    "--config.schedule.warmup_steps=2",
    "--config.schedule.peak_lr=1e-2",
    "--config.schedule.min_lr=1e-3",
    "--config.train.log_every_steps=1",
]


def run(workdir, *overrides, capsys=None):
    status = train.main(["train", *SMALL, f"--workdir={workdir}", *overrides])
    return status


def records(workdir, kind="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A short pretraining run (warmup + cosine) with checkpoints at steps 10 and 20."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    assert run(workdir, "--config.train.steps=20", "--config.checkpoint.every_steps=10") == 0
    return workdir


def test_loss_falls_and_outputs_are_written(pretrained):
    recs = records(pretrained)
    assert [r["step"] for r in recs] == list(range(20))
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0, (recs[0]["loss"], recs[-1]["loss"])
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "phase", "mfu", "tflops_per_device"):
        assert key in recs[-1]
    assert recs[-1]["mfu"] is None  # no peak FLOP/s is known for a CPU: never a made-up number
    # The model FLOPs of the tokens trained per second, shared by the 8 devices.
    mc = model.ModelConfig.from_config(json.load(open(os.path.join(pretrained, "config.json")))["model"])
    want = recs[-1]["tokens_per_sec"] * flops.flops_per_token(mc, 32) / 8 / 1e12
    assert recs[-1]["tflops_per_device"] == pytest.approx(want, rel=1e-9) and want > 0
    assert recs[-1]["tokens"] == 20 * 8 * 32
    cfg = json.load(open(os.path.join(pretrained, "config.json")))
    assert cfg["train"]["steps"] == 20
    assert sorted(os.listdir(os.path.join(pretrained, "checkpoints"))) == ["10", "20"]


def test_checkpoint_metadata_carries_the_schedule(pretrained):
    from cpt_jax import checkpoint

    meta = checkpoint.read_metadata(os.path.join(pretrained, "checkpoints"))
    assert meta["step"] == 20 and meta["tokens_seen"] == 20 * 8 * 32
    assert meta["schedule"]["name"] == "warmup_cosine"
    assert meta["lr_min"] == pytest.approx(1e-3) and meta["lr_max"] == pytest.approx(1e-2)
    assert meta["model"]["d_model"] == 64 and "layers.wq" in meta["param_shapes"]


def test_resume_continues_steps_lr_and_losses_exactly(pretrained, tmp_path, capsys):
    interrupted = str(tmp_path / "interrupted")
    assert run(interrupted, "--config.train.steps=20", "--config.checkpoint.every_steps=10",
               "--config.train.stop_at=10") == 0
    assert [r["step"] for r in records(interrupted)] == list(range(10))
    before = _files(interrupted)
    capsys.readouterr()
    assert run(interrupted, "--config.train.steps=20", "--config.checkpoint.every_steps=10",
               "--config.train.stop_at=10") == 0  # the same stop_at again: nothing to do
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{interrupted}/checkpoints: the run is finished (step 10 of 20 is checkpointed, train.stop_at 10); "
        "nothing to do, nothing written (raise train.stop_at to continue)"]
    assert _files(interrupted) == before
    assert run(interrupted, "--config.train.steps=20", "--config.checkpoint.every_steps=10") == 0
    resumed, straight = records(interrupted), records(pretrained)
    assert [r["step"] for r in resumed] == list(range(20))
    for a, b in zip(resumed, straight, strict=True):
        assert a["lr"] == b["lr"] and a["loss"] == b["loss"], (a, b)


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.join(d, n)] = f.read()
    return out


def test_rerunning_a_finished_run_says_so_and_writes_nothing(pretrained, capsys):
    before = _files(pretrained)
    root = os.path.join(pretrained, "checkpoints")
    capsys.readouterr()
    for extra in ([], ["--config.train.stop_at=10"]):
        assert run(pretrained, "--config.train.steps=20", "--config.checkpoint.every_steps=10", *extra) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"{root}: the run is finished (step 20 of 20 is checkpointed); nothing to do, nothing "
                       "written (use a new --workdir for another run)"]
    assert _files(pretrained) == before


def test_init_from_starts_at_the_checkpoints_lr_min(pretrained, tmp_path):
    cpt = str(tmp_path / "cpt")
    status = run(cpt, "--config.schedule.name=recipe", f"--config.init_from={pretrained}/checkpoints",
                 "--config.train.steps=10")
    assert status == 0
    recs = records(cpt)
    assert recs[0]["step"] == 0
    assert recs[0]["lr"] == float(np.float32(1e-3))  # the pretrained run's min_lr, exactly
    assert recs[-1]["lr"] < recs[0]["lr"]
    # Continuing from trained weights starts far below a fresh model's loss (ln 128 = 4.85).
    assert recs[0]["loss"] < records(pretrained)[-1]["loss"] + 0.3


def test_config_file_argument(tmp_path):
    from cpt_jax import cli

    cfg, _ = cli.parse(["train", "--config=configs/recipe.py:qwen2_7b", "--config.train.steps=7"])
    assert cfg.model.qkv_bias and cfg.model.n_layers == 28 and cfg.train.steps == 7


def test_optimizer_state_is_sharded_like_the_parameters(tmp_path):
    import jax

    from cpt_jax import optim, resolve, train_step

    cfg, workdir = train.parse_args(["train", *SMALL, f"--workdir={tmp_path / 'w'}"])
    run = resolve.for_training(cfg, workdir)
    tx = optim.build(cfg.optim)
    abstract, _ = train_step.abstract_state(run.model_config, run.param_shardings, run.mesh, tx)
    moments = [x for path, x in jax.tree_util.tree_flatten_with_path(abstract["opt_state"])[0]
               if jax.tree_util.keystr(path).endswith("['wq']")]
    assert len(moments) == 2  # Adam's mu and nu
    wq_sharding = run.param_shardings["layers"]["wq"]
    for m in moments:
        assert m.sharding == wq_sharding
        assert m.sharding.shard_shape(m.shape)[1] == m.shape[1] // 8  # embed over fsdp=8: 1/8 per device
