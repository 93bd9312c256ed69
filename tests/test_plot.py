"""python -m cpt_jax.plot on synthesized metrics.jsonl files: the data, the panels, the PNG, bad inputs."""

import json
import math
import os
import struct

import numpy as np
import pytest

from cpt_jax import plot


def write_run(directory, records, config=None, tail=""):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return str(directory)


def recipe_records():
    """100 steps of 4 x 16 tokens, logged every 10 steps; phase 1 (QA blend) from step 70; evals."""
    records = [{
        "kind": "plan", "step": 0, "schedule": {"name": "recipe"},
        "phases": [{"index": 0, "start_step": 0, "weights": {"general": 1.0}, "start_at": None},
                   {"index": 1, "start_step": 70, "weights": {"general": 0.5, "qa": 0.5},
                    "start_at": {"lr_at_most": 0.2}}],
    }]
    for step in range(9, 100, 10):
        records.append({
            "kind": "train", "step": step, "loss": 3.0 - step / 100, "lr": 1e-4 * (1 - step / 200),
            "grad_norm": 0.5, "tokens": (step + 1) * 64, "tokens_per_sec": 1000.0, "phase": int(step >= 70),
            "tokens_per_source": {"general": (step + 1) * 64, "qa": 0},
        })
    for step in (49, 100):
        records.append({
            "kind": "eval", "step": step,
            "sources": {"general": {"loss": 2.5 - step / 1000, "perplexity": 12.0, "bits_per_byte": 1.1},
                        "qa": {"loss": 2.8 - step / 500, "perplexity": 15.0, "bits_per_byte": 1.2}},
            "tasks": {"arc": {"acc": 0.3 + step / 1000, "acc_norm": 0.31, "n": 100}},
        })
    records.append({"kind": "event", "step": 100, "checkpoint_saves": 2})
    return records


def baseline_records():
    """No config.json; one phase; a non-finite loss (written as the string "nan"); a restart that re-ran step 19."""
    records = [{"kind": "plan", "step": 0, "phases": [{"index": 0, "start_step": 0, "weights": {"general": 1.0}}]}]
    for step in range(9, 100, 10):
        loss = "nan" if step == 29 else 3.1 - step / 120
        records.append({"kind": "train", "step": step, "loss": loss, "lr": 1e-4, "tokens": (step + 1) * 64})
    records.insert(2, {"kind": "train", "step": 19, "loss": 99.0, "lr": 1e-4, "tokens": 20 * 64})  # superseded
    records.append({"kind": "eval", "step": 100, "sources": {"general": {"loss": 2.45}, "qa": {"loss": "inf"}}})
    return records


@pytest.fixture
def two_runs(tmp_path):
    recipe = write_run(tmp_path / "recipe", recipe_records(),
                       config={"train": {"batch_size": 4, "seq_len": 16, "steps": 100}})
    baseline = write_run(tmp_path / "baseline", baseline_records())
    return recipe, baseline


def test_load_run_data(two_runs):
    recipe, baseline = two_runs
    run = plot.load_run(recipe)
    assert run["name"] == "recipe" and run["tokens_per_step"] == 64 and run["steps"] == 100
    train = run["train"]
    np.testing.assert_array_equal(train["step"], np.arange(9, 100, 10))
    np.testing.assert_array_equal(train["tokens"], (np.arange(9, 100, 10) + 1) * 64)
    np.testing.assert_allclose(train["loss"], 3.0 - np.arange(9, 100, 10) / 100)
    np.testing.assert_array_equal(train["phase"], [0] * 7 + [1] * 3)
    np.testing.assert_array_equal(train["tokens_per_source"]["general"], train["tokens"])
    # Eval tokens: step 49 is a train record's (50 x 64); step 100 is step x tokens_per_step.
    np.testing.assert_array_equal(run["eval"]["tokens"], [50 * 64, 100 * 64])
    np.testing.assert_allclose(run["eval"]["sources"]["qa"]["loss"], [2.8 - 0.098, 2.8 - 0.2])
    np.testing.assert_allclose(run["eval"]["tasks"]["arc"]["acc"], [0.349, 0.4])
    np.testing.assert_array_equal(run["eval"]["tasks"]["arc"]["tokens"], [50 * 64, 100 * 64])
    assert [(p["index"], p["start_step"], p["start_tokens"]) for p in run["phases"]] == [(0, 0, 0), (1, 70, 70 * 64)]
    assert run["phases"][1]["weights"] == {"general": 0.5, "qa": 0.5}
    assert run["events"][0]["checkpoint_saves"] == 2

    base = plot.load_run(baseline)
    assert base["tokens_per_step"] == 64 and base["steps"] is None  # inferred from the train records
    assert len(base["train"]["step"]) == 10  # one record per step, the last written
    assert base["train"]["loss"][1] == pytest.approx(3.1 - 19 / 120)
    assert math.isnan(base["train"]["loss"][2])
    assert base["eval"]["tokens"].tolist() == [6400.0]
    assert base["eval"]["sources"]["qa"]["loss"].tolist() == [math.inf]
    assert base["eval"]["tasks"] == {}


def test_figure_panels_and_lines(two_runs):
    runs = [plot.load_run(w) for w in two_runs]
    fig = plot.make_figure(runs, ["recipe", "baseline"])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == list(plot.PANELS)
    assert len(axes["training loss"].get_lines()) == 2
    # 2 runs x 2 sources; baseline's qa (all inf) has nothing to draw.
    val = axes["validation loss"]
    assert [line.get_label() for line in val.get_lines()] == ["recipe: general", "recipe: qa", "baseline: general"]
    assert len(axes["task accuracy"].get_lines()) == 1  # only the recipe has tasks
    lr = axes["learning rate"]
    assert len(lr.get_lines()) == 2
    # Phases shaded: 2 for the recipe, 1 for the baseline; one switch line (the recipe's, at 70 x 64 tokens).
    assert len(lr.patches) == 3
    assert len(lr.collections) == 1
    assert lr.get_xlabel() == "tokens (K)"
    np.testing.assert_allclose(axes["training loss"].get_lines()[0].get_xdata(), (np.arange(9, 100, 10) + 1) * 0.064)
    assert not any(t.get_text().startswith("no ") for ax in fig.axes for t in ax.texts)


def test_panels_without_data_say_so(tmp_path):
    only_train = [{"kind": "train", "step": s, "loss": 2.0, "lr": 1e-3, "tokens": (s + 1) * 8} for s in range(5)]
    run = plot.load_run(write_run(tmp_path / "a", only_train))
    fig = plot.make_figure([run], ["a"])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == list(plot.PANELS)  # same layout as a full run
    assert [t.get_text() for t in axes["validation loss"].texts] == ["no eval records"]
    assert [t.get_text() for t in axes["task accuracy"].texts] == ["no task records"]
    assert not axes["validation loss"].get_lines() and not axes["task accuracy"].get_lines()
    empty = plot.load_run(write_run(tmp_path / "b", []))
    fig = plot.make_figure([empty], ["b"])
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes}
    assert texts["training loss"] == ["no train records"] and texts["learning rate"] == ["no train records"]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_main_writes_a_comparison_png(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert plot.main(list(two_runs) + ["--labels", "recipe, baseline"]) == 0
    out = tmp_path / "comparison.png"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert png_size(out) == (1430, 935)
    assert out.stat().st_size > 20_000


def test_main_one_run_defaults_to_its_workdir(two_runs, tmp_path):
    recipe, _ = two_runs
    assert plot.main([recipe]) == 0
    assert png_size(os.path.join(recipe, "plot.png")) == (1430, 935)
    assert plot.main([recipe, "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").stat().st_size > 20_000


def test_default_labels():
    assert plot.default_labels(["/r/recipe", "/r/baseline/"]) == ["recipe", "baseline"]
    assert plot.default_labels(["/a/run", "/b/run"]) == ["a/run", "b/run"]


def test_unterminated_last_line_is_a_record_being_written(tmp_path):
    d = write_run(tmp_path / "live", recipe_records(), tail='{"kind": "train", "step": 109, "lo')
    assert plot.load_run(d)["train"]["step"][-1] == 99


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "missing: no such directory"),
        ("file", "afile: not a directory"),
        ("no_metrics", "empty/metrics.jsonl: not found"),
        ("bad_line", "bad/metrics.jsonl:3: not valid JSON"),
        ("not_object", "list/metrics.jsonl:2: a JSON list, expected an object"),
        ("no_step", "nostep/metrics.jsonl:1: eval record without an integer 'step'"),
        ("bad_config", "badcfg/config.json: not readable JSON"),
        ("labels", "--labels: 'one' names 1 runs, expected 2"),
        ("out_dir", "dir.png: directory"),
        ("out_format", "extension 'notaformat' is not an image format"),
        ("flag", "unrecognized arguments: --bogus"),
    ],
)
def test_bad_inputs_are_one_line(case, expected, two_runs, tmp_path, capsys):
    recipe, baseline = two_runs
    argv = {
        "missing": [str(tmp_path / "missing")],
        "file": [str(tmp_path / "afile")],
        "no_metrics": [str(tmp_path / "empty")],
        "bad_line": [str(tmp_path / "bad")],
        "not_object": [str(tmp_path / "list")],
        "no_step": [str(tmp_path / "nostep")],
        "bad_config": [str(tmp_path / "badcfg")],
        "labels": [recipe, baseline, "--labels", "one"],
        "out_dir": [recipe, "--out", str(tmp_path / "no" / "such" / "dir.png")],
        "out_format": [recipe, "--out", str(tmp_path / "plot.notaformat")],
        "flag": [recipe, "--bogus"],
    }[case]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "bad", recipe_records()[:2])
    with open(tmp_path / "bad" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps(recipe_records()[3]) + "\n")
    write_run(tmp_path / "list", recipe_records()[:1] + [[1, 2]])
    write_run(tmp_path / "nostep", [{"kind": "eval", "sources": {}}])
    write_run(tmp_path / "badcfg", recipe_records())
    (tmp_path / "badcfg" / "config.json").write_text("{")
    assert plot.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
