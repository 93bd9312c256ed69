"""Run records: metrics.jsonl, readable TensorBoard events, optional Weights & Biases."""

import glob
import json
import os
import struct
import sys
import types

import ml_collections
import pytest
from tensorboardX.proto import event_pb2

from cpt_jax import config
from cpt_jax.metrics import MetricsWriter


def read_events(directory):
    """(tag, step, value) of every scalar in the TFRecord event files under `directory`."""
    out = []
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def test_jsonl_and_tensorboard_records(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=True)
    w.write({"kind": "train", "step": 3, "loss": 2.5, "lr": 1e-3, "mfu": None, "tokens_per_source": {"a": 10}})
    w.write({"kind": "eval", "step": 4, "sources": {"web": {"loss": 3.0, "perplexity": 20.1}},
             "tasks": {"qa": {"acc": 0.5, "acc_norm": 0.75, "n": 8}}})
    w.write({"kind": "train", "step": 5, "loss": float("nan")})
    w.close()
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [3, 4, 5]
    assert lines[0]["mfu"] is None and lines[2]["loss"] == "nan"
    scalars = {(tag, step): value for tag, step, value in read_events(str(tmp_path / "tb"))}
    assert scalars[("train/loss", 3)] == 2.5
    assert scalars[("train/tokens_per_source/a", 3)] == 10
    assert scalars[("eval/sources/web/loss", 4)] == 3.0
    assert scalars[("eval/tasks/qa/acc_norm", 4)] == 0.75
    assert ("train/mfu", 3) not in scalars  # null is not a number to plot


def test_wandb_when_configured(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = ml_collections.ConfigDict({"project": "cpt", "entity": "", "run_name": ""})
    (tmp_path / "run7").mkdir()
    w = MetricsWriter(str(tmp_path / "run7"), tensorboard=False, wandb_cfg=cfg, run_config={"seed": 0})
    w.write({"kind": "train", "step": 1, "loss": 2.0})
    w.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "cpt" and calls[0][1]["name"] == "run7"
    assert calls[1] == ("log", 1, {"train/loss": 2.0}) and calls[-1] == ("finish",)


def test_wandb_configured_but_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = config.default_config()
    cfg.wandb.project = "cpt"
    with pytest.raises(config.ConfigError, match="wandb.project: 'cpt' but the wandb package is not installed"):
        config.validate(cfg)
