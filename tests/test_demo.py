"""The end-to-end demo at tiny scale (every stage and every number of its report), one ablation reusing
its base model, and the corpus generator (held-out questions never trained on; determinism)."""

import json
import math
import os
import re

import pytest

from cpt_jax import checkpoint, demo, demo_corpus, schedules
from cpt_jax.config import default_config

S = demo.SCALES["tiny"]
RUNS = ("baseline", "recipe", "rewarm")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo") / "out")
    return workdir


@pytest.fixture(scope="module")
def demo_run(demo_dir):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = demo.main(["--workdir", demo_dir, "--scale", "tiny"])
    assert status == 0, out.getvalue()
    return out.getvalue()


def _records(workdir, kind):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _final_eval(workdir, steps):
    return [r for r in _records(workdir, "eval") if r["step"] == steps][-1]


def _row(report, name):
    """The cells of the first table row of `name` in the report."""
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_stage_ran(demo_dir, demo_run):
    for stage in ("corpus", "tokenizer", "prepare", "base", "continue", "report"):
        assert f"[demo] {stage}:" in demo_run
    assert f"report: {os.path.join(demo_dir, 'report.md')}" in demo_run
    assert os.path.isfile(os.path.join(demo_dir, "tokenizer.model"))
    for name in demo.SOURCES:
        manifest = json.load(open(os.path.join(demo_dir, "prepared", name, "manifest.json")))
        assert manifest["tokens"] > 0 and manifest["examples"] > 0 and manifest["val_examples"] > 0
    meta = checkpoint.read_metadata(os.path.join(demo_dir, "base", "checkpoints"))
    assert meta["step"] == S.base_steps
    assert meta["lr_max"] == pytest.approx(S.peak_lr) and meta["lr_min"] == pytest.approx(S.min_lr)
    for run in RUNS:
        train = _records(os.path.join(demo_dir, "runs", run), "train")
        assert [r["step"] for r in train] == list(range(S.cpt_steps))
        _final_eval(os.path.join(demo_dir, "runs", run), S.cpt_steps)
    with open(os.path.join(demo_dir, "report.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_schedules_start_from_the_base_checkpoint(demo_dir, demo_run):
    meta = checkpoint.read_metadata(os.path.join(demo_dir, "base", "checkpoints"))
    start = meta["lr_min"]
    baseline = [r["lr"] for r in _records(os.path.join(demo_dir, "runs", "baseline"), "train")]
    assert baseline == pytest.approx([start] * S.cpt_steps, rel=1e-6)
    recipe = [r["lr"] for r in _records(os.path.join(demo_dir, "runs", "recipe"), "train")]
    assert recipe[0] == pytest.approx(start, rel=1e-6) and recipe == sorted(recipe, reverse=True)
    assert recipe[-1] < start / 50
    rewarm = [r["lr"] for r in _records(os.path.join(demo_dir, "runs", "rewarm"), "train")]
    assert rewarm[0] == pytest.approx(start, rel=1e-6) and max(rewarm) == pytest.approx(meta["lr_max"], rel=1e-6)
    baseline_tokens = _records(os.path.join(demo_dir, "runs", "baseline"), "train")[-1]["tokens_per_source"]
    assert baseline_tokens["B"] == baseline_tokens["qa"] == 0


def test_report_holds_every_number(demo_dir, demo_run):
    report = open(os.path.join(demo_dir, "report.md")).read()
    meta = checkpoint.read_metadata(os.path.join(demo_dir, "base", "checkpoints"))
    numbers = {}
    for run in RUNS:
        workdir = os.path.join(demo_dir, "runs", run)
        final = _final_eval(workdir, S.cpt_steps)
        numbers[run] = (final["sources"]["A"]["loss"], final["sources"]["B"]["loss"],
                        final["tasks"]["heldout_qa"]["acc"])
        cells = _row(report, run)
        assert cells[1:4] == [f"{x:.3f}" for x in numbers[run]]
        assert cells[4] == f"{final['sources']['qa']['loss']:.3f}"

        train = _records(workdir, "train")
        actual = next((r["step"] for r in train if r["phase"] == 1), None)
        if run == "baseline":
            assert actual is None and cells[5:7] == ["-", "-"]
        else:
            cfg = default_config().schedule
            cfg.update(json.load(open(os.path.join(workdir, "config.json")))["schedule"])
            sched = schedules.build(cfg, S.cpt_steps, meta["lr_min"])
            planned = schedules.crossing_step(sched, 0.2 * meta["lr_min"])
            assert planned == actual and 0 < actual < S.cpt_steps
            assert cells[5:7] == [str(planned), str(actual)]
            assert f"- {run}: planned switch step {planned}, actual {actual}: agree" in report

        tokens = train[-1]["tokens_per_source"]
        total = S.cpt_steps * S.batch_size * S.seq_len
        assert sum(tokens.values()) == total
        token_row = next(line for line in report.splitlines() if line.startswith(f"| {run} | ")
                         and line.endswith(f" | {total} |"))
        assert token_row == f"| {run} | {tokens['A']} | {tokens['B']} | {tokens['qa']} | {total} |"

    # Every "better/worse" comes from the numbers: lower loss, higher accuracy is better.
    def verdict(value, reference, lower):
        if round(value, 3) == round(reference, 3):
            return "same"
        return "better" if (round(value, 3) < round(reference, 3)) == lower else "worse"

    for run in ("recipe", "rewarm"):
        expected = [verdict(v, r, lower) for v, r, lower in zip(numbers[run], numbers["baseline"],
                                                                 (True, True, False), strict=True)]
        assert _row(report, run)[7] == ", ".join(expected)
    for (label, _, lower), v, r in zip(demo.METRICS, numbers["recipe"], numbers["baseline"], strict=True):
        assert f"- {label}: recipe {v:.3f} vs baseline {r:.3f} -> the recipe is **{verdict(v, r, lower)}**" in report
    # The table is printed at the end of the run too.
    assert _row(report, "recipe") == _row(demo_run, "recipe")


def test_training_text_never_asks_a_heldout_question(demo_dir, demo_run):
    heldout = [json.loads(line) for line in open(os.path.join(demo_dir, "corpus", "heldout_qa.jsonl"))]
    assert heldout and all(len(r["choices"]) == 4 for r in heldout)
    text = ""
    for name in demo.SOURCES:
        text += "".join(json.loads(line)["text"] + "\n" for line in open(os.path.join(demo_dir, "corpus",
                                                                                         f"{name}.jsonl")))
    for r in heldout:
        question = r["context"].removesuffix(" A:")
        assert question.startswith("Q: ") and question not in text
        name = re.search(r"(?:of|was) (\w+ \w+)", question).group(1)
        assert name in text  # the facts are in the biographies


def test_wrong_scale_for_the_workdir_is_refused(demo_dir, demo_run, capsys):
    assert demo.main(["--workdir", demo_dir, "--scale", "small"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scale 'tiny'" in err[0]


def test_floor_ablation_reuses_the_base(demo_dir, demo_run, capsys):
    base_metrics = os.path.join(demo_dir, "base", "metrics.jsonl")
    before = os.stat(base_metrics).st_mtime_ns
    assert demo.main(["--workdir", demo_dir, "--scale", "tiny", "--ablation", "floor"]) == 0
    out = capsys.readouterr().out
    assert os.stat(base_metrics).st_mtime_ns == before
    assert "reusing" in out and "[demo] corpus: reusing" in out
    meta = checkpoint.read_metadata(os.path.join(demo_dir, "base", "checkpoints"))
    dirs = {"floor_10pct": os.path.join(demo_dir, "ablations", "floor_10pct"),
            "floor_1pct": os.path.join(demo_dir, "runs", "recipe"),  # the same setting as the main recipe run
            "floor_0.1pct": os.path.join(demo_dir, "ablations", "floor_0.1pct")}
    assert not os.path.exists(os.path.join(demo_dir, "ablations", "floor_1pct"))
    report = open(os.path.join(demo_dir, "report.md")).read()
    assert "## Main comparison" in report and "## Ablation: floor" in report
    section = report.split("## Ablation: floor", 1)[1]
    numbers = {}
    for name, workdir in dirs.items():
        final = _final_eval(workdir, S.cpt_steps)
        numbers[name] = (final["sources"]["A"]["loss"], final["sources"]["B"]["loss"],
                         final["tasks"]["heldout_qa"]["acc"])
        assert _row(section, name)[1:4] == [f"{x:.3f}" for x in numbers[name]]
    ratio = {"floor_10pct": 0.1, "floor_0.1pct": 0.001}
    for name, r in ratio.items():
        lr = [rec["lr"] for rec in _records(dirs[name], "train")]
        cosine_end = meta["lr_min"] * (r + (1 - r) * (1 + math.cos(math.pi * (S.cpt_steps - 1) / S.cpt_steps)) / 2)
        assert lr[-1] == pytest.approx(cosine_end, rel=1e-4)
    for i, (label, _, lower) in enumerate(demo.METRICS):
        values = {name: v[i] for name, v in numbers.items()}
        best = (min if lower else max)(values, key=values.get)
        agrees = "agrees" if best == "floor_1pct" else "does not agree"
        assert f"- by {label}: best is `{best}` -> {agrees}" in section
    assert os.path.isfile(os.path.join(demo_dir, "report_floor.png"))


def test_corpus_holds_out_questions():
    c = demo_corpus.generate(7, people_a=40, people_b=30, filler_docs=20)
    names_a = {p.name for p in c.people_a}
    names_b = {p.name for p in c.people_b}
    assert not names_a & names_b and len(names_a) == 40 and len(names_b) == 30
    assert c.heldout_names <= names_b and len(c.heldout) == 4 * len(c.heldout_names) == 4 * 6
    assert len(c.qa_train) == 4 * (30 - 6)
    training = "\n".join(c.training_texts())
    for rec in c.heldout:
        assert rec["name"] in c.heldout_names
        assert rec["context"].removesuffix(" A:") not in training
        assert all(rec["name"] not in qa for qa in c.qa_train)
        person = next(p for p in c.people_b if p.name == rec["name"])
        assert rec["choices"][rec["gold"]] == person.attribute(rec["attribute"])
        assert len(set(rec["choices"])) == 4 and set(rec["choices"]) <= set(demo_corpus.VOCABULARY[rec["attribute"]])
        # the answer is in the person's biographies (B), stated with the person's name
        assert any(rec["name"] in bio and person.attribute(rec["attribute"]) in bio for bio in c.b_bios)
    assert not any("Q:" in t for t in (*c.a_bios, *c.b_bios, *c.filler))
    assert all(re.fullmatch(r"Q: .+\? A: \S+", qa) for qa in c.qa_train)


def test_corpus_is_deterministic(tmp_path):
    a, b = demo_corpus.generate(3, people_a=30, people_b=20), demo_corpus.generate(3, people_a=30, people_b=20)
    assert a == b
    assert demo_corpus.generate(4, people_a=30, people_b=20) != a
    paths_1 = demo_corpus.write(a, str(tmp_path / "one"))
    paths_2 = demo_corpus.write(b, str(tmp_path / "two"))
    for name in paths_1:
        assert open(paths_1[name], "rb").read() == open(paths_2[name], "rb").read()
    # prepare takes the val split from the end of B: the held-out people's bios come first (trained on).
    b_docs = [json.loads(line)["text"] for line in open(paths_1["B"])]
    flags = [any(n in d for n in a.heldout_names) for d in b_docs]
    assert flags == sorted(flags, reverse=True) and any(flags)
