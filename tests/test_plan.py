"""Tests of `python -m cpt_jax.plan`: the numbers of the recipe's plan, epochs from manifests,
start_lr from a checkpoint, the PNG, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from data_helpers import write_synthetic_source

from cpt_jax import plan as plan_lib
from cpt_jax.config import ConfigError, default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The paper's run: 300B tokens of 1152 x 4096, recipe cosine from 4.5e-5 to 1%, GB -> QB at start/5.
RECIPE_FILE = """
from cpt_jax.config import default_config


def get_config():
    c = default_config()
    c.train.batch_size = 1152
    c.train.seq_len = 4096
    c.model.max_seq_len = 4096
    c.train.steps = 300_000_000_000 // (1152 * 4096)
    c.schedule.name = "recipe"
    c.schedule.start_lr = 4.5e-5
    c.schedule.final_ratio = 0.01
    c.data.kind = "mixture"
    c.data.tokenizer = "/not/prepared/tok.model"
    c.data.sources = dict(web="/not/prepared/web", books="/not/prepared/books", qa="/not/prepared/qa")
    c.data.phases = (
        dict(weights=dict(web=0.7, books=0.3)),
        dict(weights=dict(web=0.6, books=0.3, qa=0.1), start_at=dict(lr_ratio=0.2)),
    )
    return c
"""


def recipe_config():
    namespace: dict = {}
    exec(RECIPE_FILE, namespace)  # the same config the CLI tests load from a file
    return namespace["get_config"]()


def small_config(sources: dict, phases: tuple, steps: int = 100, batch: int = 4, seq_len: int = 16):
    c = default_config()
    c.train.steps, c.train.batch_size, c.train.seq_len = steps, batch, seq_len
    c.schedule.start_lr = 1e-3
    c.data.kind = "mixture"
    c.data.tokenizer = "/unused/tok.model"
    c.data.sources = sources
    c.data.phases = phases
    return c


# ----------------------------------------------------------------------------- numbers


def test_recipe_plan_switches_at_71_1_percent():
    cfg = recipe_config()
    p = plan_lib.make_plan(cfg)
    steps = 300_000_000_000 // (1152 * 4096)
    assert p["steps"] == steps == 63578
    assert p["tokens_per_step"] == 1152 * 4096 and p["total_tokens"] == steps * 1152 * 4096
    s = p["schedule"]
    assert s["name"] == "recipe" and s["start_lr"] == 4.5e-5 and s["peak_step"] == 0
    assert s["lr_min"] == pytest.approx(4.5e-7)
    assert len(p["lr"]) == steps + 1 and p["lr"][0] == pytest.approx(4.5e-5)

    first, second = p["phases"]
    assert (first["start_step"], first["end_step"]) == (0, second["start_step"])
    assert second["end_step"] == steps
    t_star = math.acos(2 * (0.2 - 0.01) / 0.99 - 1) / math.pi  # 0.71131...
    assert abs(second["fraction"] - t_star) < 1 / steps + 1e-9
    assert round(100 * second["fraction"], 1) == 71.1
    assert round(second["start_tokens"] / 1e9, 1) == 213.4
    # The LR is at start/5 at the switch and above it one step before.
    assert second["lr_at_start"] <= 0.2 * 4.5e-5 * (1 + 1e-6) < p["lr"][second["start_step"] - 1]
    assert second["start_at"] == {"lr_ratio": 0.2} and first["start_at"] is None

    # Tokens per source per phase add up to each phase's tokens, and the phases to the run.
    for phase in p["phases"]:
        assert sum(phase["tokens_per_source"].values()) == phase["tokens"]
        assert phase["tokens"] == (phase["end_step"] - phase["start_step"]) * p["tokens_per_step"]
    assert sum(ph["tokens"] for ph in p["phases"]) == p["total_tokens"]
    assert sum(p["tokens_per_source"].values()) == p["total_tokens"]
    assert first["tokens_per_source"]["qa"] == 0
    assert second["tokens_per_source"]["qa"] == pytest.approx(0.1 * second["tokens"], abs=4096)
    assert first["tokens_per_source"]["web"] == pytest.approx(0.7 * first["tokens"], abs=4096)
    # Placeholder paths: tokens are known, epochs are not.
    assert p["epochs"] == {"books": None, "qa": None, "web": None}
    assert p["source_examples"] == {"books": None, "qa": None, "web": None}
    assert p["warnings"] == []

    text = plan_lib.format_plan(p)
    assert "71.1%" in text and "213.4B" in text and "300.0B" in text and "(?)" in text


def test_the_shipped_recipe_15b_config(capsys):
    """configs/recipe_15b.py: the paper's run switches to the QA Blend at 71.1%, ~213.4B tokens."""
    out = os.path.join(REPO, "configs", "recipe_15b.py")
    cfg, _ = plan_lib._parse(["plan", f"--config={out}"])
    p = plan_lib.make_plan(cfg)
    second = p["phases"][1]
    assert p["schedule"]["start_lr"] == 4.5e-5 and p["schedule"]["lr_min"] == pytest.approx(4.5e-7)
    assert round(100 * second["fraction"], 1) == 71.1
    assert round(second["start_tokens"] / 1e9, 1) == 213.4
    assert round(p["total_tokens"] / 1e9, 1) == 300.0
    assert sum(p["tokens_per_source"].values()) == p["total_tokens"]
    for phase in p["phases"]:
        assert sum(phase["tokens_per_source"].values()) == phase["tokens"]
    # The QA source is off in the General Blend and 10% of the QA Blend.
    assert p["phases"][0]["tokens_per_source"]["qa"] == 0
    assert second["tokens_per_source"]["qa"] == pytest.approx(0.1 * second["tokens"], abs=4096)
    assert set(p["epochs"].values()) == {None}  # placeholder paths: not prepared here


def test_epochs_from_manifests_and_the_repeat_warning(tmp_path):
    big = write_synthetic_source(tmp_path, "big", 1000, 16)
    small = write_synthetic_source(tmp_path, "small", 30, 16)
    cfg = small_config(
        {"big": big, "small": small, "missing": str(tmp_path / "missing")},
        ({"weights": {"big": 1}}, {"weights": {"big": 1, "small": 1, "missing": 2}, "start_at": {"step": 60}})
    )
    p = plan_lib.make_plan(cfg)
    assert p["source_examples"] == {"big": 1000, "missing": None, "small": 30}
    # Phase 0: 60 steps x 4 examples of big only. Phase 1: 40 steps x 4 = 160 examples, 1:1:2.
    first, second = p["phases"]
    assert first["tokens_per_source"] == {"big": 240 * 16, "missing": 0, "small": 0}
    assert second["tokens_per_source"] == {"big": 40 * 16, "missing": 80 * 16, "small": 40 * 16}
    assert first["epochs_per_source"]["big"] == pytest.approx(0.24)
    assert second["epochs_per_source"]["small"] == pytest.approx(40 / 30)
    assert p["epochs"]["big"] == pytest.approx(0.28) and p["epochs"]["missing"] is None
    assert p["warnings"] == []  # 1.33 epochs < data.max_epochs_warning (4)

    cfg.data.max_epochs_warning = 1.0
    p = plan_lib.make_plan(cfg)
    assert p["warnings"] == [
        "source small: 1.33 epochs over the run, more than data.max_epochs_warning = 1 (40 examples drawn from 30)"
    ]
    assert "warning: source small: 1.33 epochs" in plan_lib.format_plan(p)


def test_a_source_prepared_for_another_seq_len_is_flagged(tmp_path):
    other = write_synthetic_source(tmp_path, "other", 100, 32)
    p = plan_lib.make_plan(small_config({"other": other}, ({"weights": {"other": 1}},)))
    assert len(p["warnings"]) == 1 and "prepared with seq_len 32, train.seq_len is 16" in p["warnings"][0]


def test_synthetic_plan_is_one_phase_of_one_source():
    c = default_config()
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 10
    p = plan_lib.make_plan(c)
    assert p["sources"] == ["synthetic"] and len(p["phases"]) == 1
    assert p["tokens_per_source"] == {"synthetic": p["total_tokens"]} == {"synthetic": 100 * 8 * 128}
    assert p["schedule"]["peak_step"] == 10 and p["epochs"] == {"synthetic": None}


# ----------------------------------------------------------------------------- start_lr


def _fake_checkpoint(root, lr_min):
    step_dir = root / "checkpoints" / "500"
    (step_dir / "metadata").mkdir(parents=True)
    meta = {"step": 500} if lr_min is None else {"step": 500, "lr_min": lr_min}
    (step_dir / "metadata" / "metadata").write_text(json.dumps(meta))
    return str(step_dir)


def test_start_lr_comes_from_the_init_from_checkpoint(tmp_path):
    cfg = recipe_config()
    cfg.schedule.start_lr = None
    cfg.init_from = _fake_checkpoint(tmp_path, 3e-5)
    p = plan_lib.make_plan(cfg)
    assert p["schedule"]["start_lr"] == 3e-5 and p["lr"][0] == pytest.approx(3e-5)
    assert round(100 * p["phases"][1]["fraction"], 1) == 71.1  # the ratio does not depend on it


def test_start_lr_missing_is_a_config_error(tmp_path):
    cfg = recipe_config()
    cfg.schedule.start_lr = None
    with pytest.raises(ConfigError, match=r"^schedule\.start_lr: None and no init_from.*--config\.schedule\.start_lr"):
        plan_lib.make_plan(cfg)
    cfg.init_from = _fake_checkpoint(tmp_path, None)
    with pytest.raises(ConfigError, match=r"^init_from: .* has no lr_min in its metadata"):
        plan_lib.make_plan(cfg)
    # Schedules that do not start from start_lr do not need it.
    cfg.init_from = ""
    cfg.schedule.name = "wsd"
    assert plan_lib.make_plan(cfg)["schedule"]["name"] == "wsd"


def test_plan_reports_bad_phases():
    cfg = recipe_config()
    cfg.data.phases = (cfg.data.phases[0], {"weights": {"qa": 1}, "start_at": {"lr_ratio": 0.001}})
    with pytest.raises(ConfigError, match=r"^data\.phases\[1\]\.start_at\.lr_ratio: 0\.001 .*lowest LR is 4\.5e-07"):
        plan_lib.make_plan(cfg)


# ----------------------------------------------------------------------------- the CLI


def test_main_writes_a_png_and_prints_the_plan(tmp_path, capsys):
    config_file = tmp_path / "recipe.py"
    config_file.write_text(RECIPE_FILE)
    out = tmp_path / "plan.png"
    rc = plan_lib.main(["plan", f"--config={config_file}", "--config.train.steps=1000", f"--out={out}"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    # The override applied: 1000 steps, switch at step 712.
    assert "1,000 steps" in printed.out and "712" in printed.out and "71.2%" in printed.out


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.train.stepz=5"],
            r"^error: config key 'train\.stepz': unknown key; did you mean train\.steps",
        ),
        (["--config.train.steps=abc"], r"^error: flag --config\.train\.steps=abc"),
        (["--config.data.phases=()"], r"^error: data\.phases: empty, expected at least one phase"),
        (["--config.schedule.final_ratio=2.0"], r"^error: schedule\.final_ratio: 2\.0, expected a value in \(0, 1\]"),
        (["--bogus"], r"^error: Unknown command line flag 'bogus'"),
        (["--out=/no/such/dir/plan.png"], r"^error: --out: /no/such/dir/plan\.png: No such file or directory"),
    ],
)
def test_main_bad_overrides_exit_2_with_one_line(tmp_path, capsys, args, message):
    config_file = tmp_path / "recipe.py"
    config_file.write_text(RECIPE_FILE)
    rc = plan_lib.main(["plan", f"--config={config_file}", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.endswith("\n")
    assert re.match(message, err), err


def test_main_bad_config_files_exit_2_with_one_line(tmp_path, capsys):
    cases = {
        "syntax.py": ("def get_config(:\n", r"^error: --config: SyntaxError: invalid syntax"),
        "extra.py": (
            "from cpt_jax.config import default_config\n\ndef get_config():\n    c = default_config()\n"
            "    c.train.stepz = 5\n    return c\n",
            r"^error: config key 'train\.stepz': unknown key",
        ),
        "number.py": ("def get_config():\n    return 3\n", r"^error: --config: get_config\(\) returned int, expected"),
    }
    for name, (source, message) in cases.items():
        path = tmp_path / name
        path.write_text(source)
        rc = plan_lib.main(["plan", f"--config={path}"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (name, err)
        assert re.match(message, err), (name, err)
    rc = plan_lib.main(["plan", f"--config={tmp_path / 'missing.py'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --config: ") and "missing.py does not exist" in err
    assert err.count("\n") == 1
    assert plan_lib.main(["plan"]) == 2
    assert capsys.readouterr().err.startswith("error: --config: missing, expected a config file")


def test_cli_subprocess(tmp_path):
    """The real command line: exit status 0 with a PNG; 2 and one line (no traceback) on errors."""
    config_file = tmp_path / "recipe.py"
    config_file.write_text(RECIPE_FILE)
    runs = {
        "ok": [f"--config={config_file}", f"--out={tmp_path / 'plan.png'}"],
        "override": [f"--config={config_file}", "--config.train.stepz=5"],
        "missing": [f"--config={tmp_path / 'missing.py'}"],
    }
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "cpt_jax.plan", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for name, args in runs.items()
    }
    results = {name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()}
    rc, out, err = results["ok"]
    assert rc == 0, err
    assert "71.1%" in out and (tmp_path / "plan.png").read_bytes()[:8] == PNG_SIGNATURE
    for name in ("override", "missing"):
        rc, out, err = results[name]
        assert rc == 2 and "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), (name, err)
    assert "config key 'train.stepz': unknown key; did you mean train.steps" in results["override"][2]
    assert "missing.py does not exist" in results["missing"][2]
