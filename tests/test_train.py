"""The trainer end to end: loss falls, resume continues exactly, init_from starts at lr_min, bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from cpt_jax import train

SMALL = [
    "--config=configs/tiny.py",
    "--config.model.n_layers=2",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.model.vocab_size=128",
    "--config.schedule.warmup_steps=2",
    "--config.schedule.peak_lr=1e-2",
    "--config.schedule.min_lr=1e-3",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--config.train.log_every_steps=1",
    "--config.tensorboard=False",
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
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "phase"):
        assert key in recs[-1]
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


def test_resume_continues_steps_lr_and_losses_exactly(pretrained, tmp_path):
    interrupted = str(tmp_path / "interrupted")
    assert run(interrupted, "--config.train.steps=20", "--config.checkpoint.every_steps=10",
               "--config.train.stop_at=10") == 0
    assert [r["step"] for r in records(interrupted)] == list(range(10))
    assert run(interrupted, "--config.train.steps=20", "--config.checkpoint.every_steps=10") == 0
    resumed, straight = records(interrupted), records(pretrained)
    assert [r["step"] for r in resumed] == list(range(20))
    for a, b in zip(resumed, straight, strict=True):
        assert a["lr"] == b["lr"] and a["loss"] == b["loss"], (a, b)


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


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path, capsys, *overrides, workdir=None, config=None):
    workdir = workdir or str(tmp_path / "never")
    argv = ["train", *SMALL, f"--workdir={workdir}", *overrides]
    if config:
        argv[1] = f"--config={config}"
    before = _snapshot(workdir)
    status = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert _snapshot(workdir) == before, "a failed validation changed the workdir"
    return err[0]


def _snapshot(path):
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--config.train.stepz=5"], "config key 'train.stepz': unknown key; did you mean train.steps"),
        (["--config.schedule.name=recipe", "--config.schedule.start_lr=-1e-4"], "schedule.start_lr"),
        (["--config.schedule.name=recipe", "--config.schedule.start_lr=1e-4", "--config.schedule.final_ratio=1.5"],
         "schedule.final_ratio"),
        (["--config.mesh.data=3", "--config.mesh.fsdp=2"], "mesh"),
        (["--config.model.n_kv_heads=3"], "model.n_heads"),
        (["--config.model.d_model=66"], "model.d_model"),
        (["--config.init_from=/does/not/exist"], "init_from: /does/not/exist does not exist"),
        (["--config.schedule.name=recipe"], "schedule.start_lr"),
        (["--config.train.seq_len=1024"], "train.seq_len"),
        (["--config.model.mlp=gelu"], "model.mlp"),
        (["--config.train.batch_size=12"], "train.batch_size"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, overrides, expected):
    assert expected in _bad(tmp_path, capsys, *overrides)


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg_file = tmp_path / "typo.py"
    cfg_file.write_text(
        "from cpt_jax.presets import preset_config\n"
        "def get_config():\n    c = preset_config('tiny')\n    c.train.learning_rate = 1e-3\n    return c\n"
    )
    assert "train.learning_rate" in _bad(tmp_path, capsys, config=str(cfg_file))


def test_config_file_with_syntax_error(tmp_path, capsys):
    cfg_file = tmp_path / "broken.py"
    cfg_file.write_text("def get_config(:\n")
    assert "--config" in _bad(tmp_path, capsys, config=str(cfg_file))


def test_init_from_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no complete cpt_jax checkpoint" in _bad(tmp_path, capsys, f"--config.init_from={tmp_path / 'empty'}")


def test_init_from_without_lr_min(pretrained, tmp_path, capsys):
    step_dir = tmp_path / "ckpt" / "20"
    shutil.copytree(os.path.join(pretrained, "checkpoints", "20"), step_dir)
    meta_file = step_dir / "metadata" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["lr_min"]
    meta_file.write_text(json.dumps(meta))
    msg = _bad(tmp_path, capsys, "--config.schedule.name=recipe", f"--config.init_from={step_dir}")
    assert "no lr_min" in msg and "--config.schedule.start_lr" in msg


def test_init_from_with_other_shapes(pretrained, tmp_path, capsys):
    msg = _bad(tmp_path, capsys, f"--config.init_from={pretrained}/checkpoints", "--config.model.d_ff=192")
    assert "parameter layers.w_down" in msg and "(2, 128, 64)" in msg and "(2, 192, 64)" in msg


def test_workdir_of_another_run(pretrained, tmp_path, capsys):
    other = str(tmp_path / "other")
    shutil.copytree(pretrained, other)
    msg = _bad(tmp_path, capsys, "--config.optim.weight_decay=0.5", workdir=other)
    assert "different run" in msg and "optim.weight_decay" in msg
