"""The end-to-end demo at tiny scale with two seeds (every stage, every number of its report), an
ablation that reuses its base and runs, and the accuracy groups themselves: a model trained on their
facts scores high, an untrained one near chance."""

import contextlib
import io
import json
import math
import os
import re

import pytest

from cpt_jax import checkpoint, demo
from cpt_jax.demo import corpus as corpus_lib
from cpt_jax.demo import report, runs, stats

S = runs.SCALES["tiny"]
SEEDS = (0, 1)


def _main(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = demo.main(list(argv))
    return status, out.getvalue()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo") / "out")


@pytest.fixture(scope="module")
def demo_run(demo_dir):
    status, out = _main("--workdir", demo_dir, "--scale", "tiny")
    assert status == 0, out
    return out


def _records(workdir, kind):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _samples(workdir):
    with open(os.path.join(workdir, "tasks.json")) as f:
        return {name: [q["correct"] for q in t["samples"]] for name, t in json.load(f)["tasks"].items()}


def _run_dir(demo_dir, seed, name):
    return os.path.join(demo_dir, f"seed_{seed}", "base" if name == "base" else os.path.join("runs", name))


def _task_file(demo_dir, seed, task):
    return os.path.join(demo_dir, f"seed_{seed}", "corpus", f"{task}.jsonl")


def _row(text, name):
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_stage_ran_for_every_seed(demo_dir, demo_run):
    assert S.seeds == 2  # the default runs two seeds
    for seed in SEEDS:
        tag = f"seed {seed + 1}/2"
        assert f"[demo] {tag} corpus:" in demo_run and f"[demo] {tag} base" in demo_run
        seed_dir = os.path.join(demo_dir, f"seed_{seed}")
        for name in corpus_lib.SOURCES:
            manifest = json.load(open(os.path.join(seed_dir, "prepared", name, "manifest.json")))
            assert manifest["examples"] > 0
            assert manifest["val_examples"] == 0 if name == "qa" else manifest["val_examples"] > 0
        meta = checkpoint.read_metadata(os.path.join(seed_dir, "base", "checkpoints"))
        assert meta["step"] == S.base_steps
        assert meta["lr_max"] == pytest.approx(S.peak_lr) and meta["lr_min"] == pytest.approx(S.min_lr)
        for name in runs.MAIN:
            assert f"[demo] {tag} {name}: done in" in demo_run
            workdir = _run_dir(demo_dir, seed, name)
            assert [r["step"] for r in _records(workdir, "train")] == list(range(S.run_steps))
            # Each run is a config file for the trainer, scored by the evaluator question by question.
            assert "python -m cpt_jax.train --config" in open(os.path.join(workdir, "demo_config.py")).read()
            # One evaluation of the final checkpoint gives the validation losses and the tasks; the
            # continued runs are not evaluated in the loop.
            assert _records(workdir, "eval") == []
            assert set(json.load(open(os.path.join(workdir, "tasks.json")))["sources"]) == {"A", "B"}
            samples = _samples(workdir)
            assert {k: len(v) for k, v in samples.items()} == {"retention": 4 * S.people_a,
                                                                "acquisition": 4 * S.people_b,
                                                                "heldout_qa": 4 * S.people_b}
    # The whole comparison is repeated: another corpus and another base per seed.
    corpora = [open(os.path.join(demo_dir, f"seed_{s}", "corpus", "A.jsonl")).read() for s in SEEDS]
    assert corpora[0] != corpora[1]
    assert f"report: {os.path.join(demo_dir, 'report.md')}" in demo_run
    with open(os.path.join(demo_dir, "report.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_schedules_start_from_the_base_checkpoint(demo_dir, demo_run):
    for seed in SEEDS:
        meta = checkpoint.read_metadata(os.path.join(demo_dir, f"seed_{seed}", "base", "checkpoints"))
        start = meta["lr_min"]
        lrs = {name: [r["lr"] for r in _records(_run_dir(demo_dir, seed, name), "train")] for name in runs.MAIN}
        for name in ("baseline", "recipe"):  # the same LR schedule: the data alone differs
            assert lrs[name][0] == pytest.approx(start, rel=1e-6) and lrs[name] == sorted(lrs[name], reverse=True)
            assert lrs[name][-1] < start / 50
        assert lrs["rewarm"][0] == pytest.approx(start, rel=1e-6)
        assert max(lrs["rewarm"]) == pytest.approx(meta["lr_max"], rel=1e-6)
        tokens = {name: _records(_run_dir(demo_dir, seed, name), "train")[-1]["tokens_per_source"]
                  for name in runs.MAIN}
        assert tokens["baseline"]["B"] == tokens["baseline"]["qa"] == 0
        assert tokens["recipe"]["B"] > 0 and tokens["recipe"]["qa"] > 0
        for t in tokens.values():
            assert sum(t.values()) == S.run_steps * S.batch_size * S.seq_len


def test_report_numbers_come_from_the_runs(demo_dir, demo_run):
    text = open(os.path.join(demo_dir, "report.md")).read()
    correct = {name: [_samples(_run_dir(demo_dir, s, name)) for s in SEEDS] for name in ("base", *runs.MAIN)}
    for name, per_seed in correct.items():
        cells = _row(text, name)
        accs = []
        for i, group in enumerate(corpus_lib.TASKS, start=1):
            pooled = [x for seed in per_seed for x in seed[group]]
            k, n = sum(pooled), len(pooled)
            lo, hi = stats.wilson(k, n)
            assert cells[i] == f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"
            accs.append(k / n)
        assert cells[4].startswith(f"{sum(accs) / 3:.3f} [")
        assert _row(demo_run, name) == cells  # the table is printed at the end too
    # The differences and the answer to the first question follow from the same samples.
    facts = {g: [[(r["name"], r["attribute"]) for r in map(json.loads, open(_task_file(demo_dir, s, g)))]
                 for s in SEEDS] for g in corpus_lib.TASKS}
    diffs = {g: [[float(x) - float(y) for x, y in zip(a[g], b[g], strict=True)]
                 for a, b in zip(correct["recipe"], correct["baseline"], strict=True)] for g in corpus_lib.TASKS}
    avg = stats.average(diffs, facts)
    cells = _row(text.split("| run - baseline |", 1)[1], "recipe")
    assert cells[4] == f"{100 * avg.value:+.1f} [{100 * avg.lo:+.1f}, {100 * avg.hi:+.1f}] {stats.outcome(avg)}"
    verdict = stats.verdict([stats.outcome(avg)])
    assert re.search(r"1\. \*\*The recipe against continuing on the pretraining data\*\* \(the paper: [^)]*\): "
                     r"\*\*" + verdict + r"\*\* at this scale", text)
    for key in runs.ABLATIONS:
        assert f"`python -m cpt_jax.demo --ablations {key}` runs it" in text
    assert "`python -m cpt_jax.plan` and the trainer resolve the same switch to the QA Blend" in text
    assert "The plans gave no warnings." in text


def test_report_shows_the_base_plateau(demo_dir, demo_run):
    text = open(os.path.join(demo_dir, "report.md")).read()
    every = S.base_steps // runs.BASE_EVALS
    for seed in SEEDS:
        evals = _records(_run_dir(demo_dir, seed, "base"), "eval")
        curve = [(r["step"], r["sources"]["A"]["loss"]) for r in evals]
        assert [s for s, _ in curve] == list(range(every, S.base_steps + 1, every))
        # The last tenth of the run against the tenth before it, as means of their evaluations.
        tenth = S.base_steps // 10
        last = [loss for step, loss in curve if step > S.base_steps - tenth]
        before = [loss for step, loss in curve if S.base_steps - 2 * tenth < step <= S.base_steps - tenth]
        assert len(last) == len(before) == 2
        rel = (sum(before) - sum(last)) / sum(before)
        assert stats.plateau(curve).relative_improvement == pytest.approx(rel)
        cells = _row(text, str(seed))
        assert cells[1:] == [f"{sum(before) / 2:.4f}", f"{sum(last) / 2:.4f}", f"{100 * rel:+.2f}%",
                             "yes" if rel < 0.01 else "NO"]
        assert rel < 0.01, "the tiny base must finish pretraining too"
    assert "Its validation loss on A had flattened in every seed." in text


def test_another_scale_in_the_same_workdir_is_refused(demo_dir, demo_run, capsys):
    assert demo.main(["--workdir", demo_dir, "--scale", "small"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scale 'tiny'" in err[0]


def test_a_run_trained_with_another_config_is_refused(demo_dir, demo_run, capsys):
    cfg_file = os.path.join(_run_dir(demo_dir, 0, "recipe"), "demo_config.py")
    text = open(cfg_file).read()
    try:
        with open(cfg_file, "w") as f:
            f.write(text.replace("c.seed = 0", "c.seed = 5"))
        assert demo.main(["--workdir", demo_dir, "--scale", "tiny", "--seeds", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --workdir: {cfg_file} was trained with another config; use another --workdir"]
    finally:
        with open(cfg_file, "w") as f:
            f.write(text)


@pytest.mark.parametrize("argv, message", [(["--ablations", "warmup,bogus"], "--ablations: 'bogus'"),
                                           (["--seeds", "0"], "--seeds: 0")])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    workdir = tmp_path / "out"
    assert demo.main(["--workdir", str(workdir), "--scale", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not workdir.exists()


def test_an_ablation_reuses_the_base_and_the_main_runs(demo_dir, demo_run):
    base_metrics = os.path.join(demo_dir, "seed_0", "base", "metrics.jsonl")
    recipe_metrics = os.path.join(_run_dir(demo_dir, 0, "recipe"), "metrics.jsonl")
    before = os.stat(base_metrics).st_mtime_ns, os.stat(recipe_metrics).st_mtime_ns
    status, out = _main("--workdir", demo_dir, "--scale", "tiny", "--ablations", "floor", "--seeds", "1")
    assert status == 0, out
    assert (os.stat(base_metrics).st_mtime_ns, os.stat(recipe_metrics).st_mtime_ns) == before
    assert "[demo] seed 1/1 base (pretraining on A, 400 steps): reused" in out
    assert "[demo] seed 1/1 recipe: reused" in out and "[demo] seed 1/1 floor_10pct: done in" in out
    tasks = {t: _task_file(demo_dir, 0, t) for t in corpus_lib.TASKS}
    results = {name: [runs.load_result(_run_dir(demo_dir, 0, name), S.run_steps, tasks)]
               for name in ("recipe", "floor_10pct", "floor_0.1pct")}
    for name, ratio in (("floor_10pct", 0.1), ("floor_0.1pct", 0.001)):
        start = results[name][0].first_lr
        last = start * (ratio + (1 - ratio) * (1 + math.cos(math.pi * (S.run_steps - 1) / S.run_steps)) / 2)
        assert results[name][0].last_lr == pytest.approx(last, rel=1e-4)
    question = next(q for q in runs.QUESTIONS if q.key == "floor")
    verdict, lines = report.answer(question, results)
    text = open(os.path.join(demo_dir, "report.md")).read()
    assert f"3. **How far the cosine decays** (the paper: {question.paper}): **{verdict}** at this scale." in text
    for line in lines:
        assert f"   - {line}" in text
    assert "| floor_10pct |" in text and "--ablations floor` runs it" not in text


def _fact_task_files(root, people, seed):
    """A corpus of `people` + `people` people: its task files, its tokenizer, and the texts of every
    fact the tasks ask (A and B biographies, the held-out questions with their answers)."""
    from cpt_jax.data.tokenization import train_sentencepiece

    c = corpus_lib.generate(seed, people_a=people, people_b=people, bios_per_person=10, val_bios=2)
    paths = corpus_lib.write(c, str(root / "corpus"))
    answers = [f"{r['context']} {r['choices'][r['gold']]}" for r in c.tasks["heldout_qa"]]
    texts = [*c.a_bios, *c.b_bios, *answers, *answers]
    tok_path = str(root / "tokenizer.model")
    train_sentencepiece([*texts, *c.a_val], tok_path, S.vocab_size, model_type="bpe", byte_fallback=False,
                        num_threads=2)
    return c, {t: paths[t] for t in corpus_lib.TASKS}, tok_path, texts


@pytest.fixture(scope="module")
def trained_on_the_facts(tmp_path_factory):
    """Every task of an 8 + 8 people corpus scored (python -m cpt_jax.evaluate --log_samples, as the
    demo scores its runs) on a tiny model trained on every fact the tasks ask."""
    from cpt_jax.data.packing import prepare
    from cpt_jax.data.tokenization import load_tokenizer, resolve_bos

    root = tmp_path_factory.mktemp("facts")
    c, tasks, tok_path, texts = _fact_task_files(root, 8, 11)
    docs = [*texts, *c.a_val]  # the validation biographies last: the source's val split
    with open(root / "facts.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    tok = load_tokenizer(tok_path)
    counts = [len(ids) + 1 + resolve_bos("auto", tok) for ids in tok.encode_batch(docs)]
    val = corpus_lib.validation_examples(counts, len(c.a_val), S.seq_len + 1)
    prepare([f"jsonl:{root / 'facts.jsonl'}"], tok_path, S.seq_len, str(root / "facts"), val_examples=val)
    data = runs.Data(tok_path, {"facts": str(root / "facts")}, tasks)
    workdir = str(root / "trained")
    runs.train_run(workdir, S, data, 0, 400, dict(name="warmup_cosine", peak_lr=1e-2, min_lr=1e-3, warmup_steps=40),
                   (dict(weights={"facts": 1.0}),), evals=1)
    return _samples(workdir)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """Every task of a 50 + 50 people corpus scored on freshly initialised parameters."""
    from cpt_jax import model, scoring

    _, tasks, tok_path, _ = _fact_task_files(tmp_path_factory.mktemp("chance"), 50, 12)
    mc = model.ModelConfig.from_config(dict(S.model, dtype="float32", vocab_size=S.vocab_size, max_seq_len=64))
    evaluator = scoring.TaskEvaluator(tasks, tok_path, mc, seq_len=64, batch_size=64)
    results = evaluator.evaluate(model.init_params(mc, 0), samples=True)
    return {name: [q["correct"] for q in r["samples"]] for name, r in results.items()}


@pytest.mark.parametrize("group", corpus_lib.TASKS)
def test_each_group_scores_knowledge_high_and_an_untrained_model_near_chance(trained_on_the_facts, untrained,
                                                                             group):
    known = trained_on_the_facts[group]
    assert len(known) == 32 and sum(known) / len(known) >= 0.8  # chance: 0.25
    guessed, chance = untrained[group], 1 / corpus_lib.CHOICES
    assert len(guessed) == 200
    assert abs(sum(guessed) / len(guessed) - chance) <= 3 * math.sqrt(chance * (1 - chance) / len(guessed))
