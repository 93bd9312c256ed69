"""The demo's scales, its continued-pretraining variants, and how one seed's data, base model and
runs are made through the product's own entry points: `prepare`, `plan`, `train` (a config file
per run, as a user writes one) and `evaluate`. A stage whose output is already there is skipped,
so a later call (more seeds, an ablation) reuses what it shares with an earlier one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable

from cpt_jax import checkpoint
from cpt_jax.config import ConfigError
from cpt_jax.demo import corpus as corpus_lib
from cpt_jax.demo.corpus import SOURCES, TASKS

GENERAL_BLEND = {"A": 0.5, "B": 0.5, "qa": 0.0}
QA_BLEND = {"A": 0.4, "B": 0.4, "qa": 0.2}
A_ONLY = {"A": 1.0, "B": 0.0, "qa": 0.0}
# The recipe ("Reuse, Don't Retrain"): cosine from the checkpoint's final LR to 1/100 of it, the
# QA Blend once the LR reaches 1/5 of the start. Fixed here, never tuned on the demo's results.
SWITCH_RATIO = 0.2
FINAL_RATIO = 0.01
BASE_EVALS = 20  # evaluations of the base: its curve, and the plateau check over the last tenth
# Continued runs are not evaluated in the loop: their final validation losses come with their
# tasks from one `python -m cpt_jax.evaluate` of the final checkpoint, as the base's do.
RUN_EVALS = 0
TASK_BATCH = 64  # question-choice rows per evaluation batch


@dataclasses.dataclass(frozen=True)
class Scale:
    """One size of the demo: corpus, model, steps, and how many seeds fit its time budget."""

    people_a: int  # population A: 4 retention questions each
    people_b: int  # population B: 4 acquisition and 4 held-out QA questions each
    bios_per_person: int  # training biographies per person
    val_bios: int  # validation biographies per population (never trained on)
    vocab_size: int
    model: dict  # model config keys (dtype float32 unless given: CPUs emulate bf16 slowly)
    seq_len: int
    batch_size: int
    base_steps: int  # pretraining of the base (a multiple of BASE_EVALS)
    run_steps: int  # every continued run (the same token budget for all)
    peak_lr: float  # the base's warmup + cosine: peak_lr -> min_lr
    min_lr: float
    eval_examples: int  # validation examples per source at each evaluation
    seeds: int  # default --seeds of the main comparison
    ablation_seeds: int  # default --seeds with --ablations


SCALES = {
    # CI: every stage, two seeds, in well under a minute on 2 CPU cores. Too few questions for
    # intervals of +-4 points: the report says so.
    "tiny": Scale(people_a=12, people_b=12, bios_per_person=10, val_bios=24, vocab_size=160,
                  model=dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64),
                  seq_len=64, batch_size=8, base_steps=400, run_steps=40, peak_lr=1e-2, min_lr=1e-3,
                  eval_examples=24, seeds=2, ablation_seeds=2),
    # The default: 320 questions per group and seed; the main comparison with 3 seeds in under 5
    # minutes on 2 CPU cores (set-up included), --ablations all with 8 seeds in under 30.
    "small": Scale(people_a=80, people_b=80, bios_per_person=20, val_bios=160, vocab_size=400,
                   model=dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=192),
                   seq_len=64, batch_size=16, base_steps=800, run_steps=300, peak_lr=1e-2, min_lr=1e-3,
                   eval_examples=128, seeds=3, ablation_seeds=8),
    # One GPU (not run on a GPU yet): 1,200 questions per group and seed, a 6-layer model in bf16.
    "medium": Scale(people_a=300, people_b=300, bios_per_person=20, val_bios=600, vocab_size=512,
                    model=dict(n_layers=6, d_model=384, n_heads=6, n_kv_heads=2, d_ff=1024, dtype="bfloat16"),
                    seq_len=128, batch_size=32, base_steps=1000, run_steps=600, peak_lr=3e-3, min_lr=3e-4,
                    eval_examples=256, seeds=3, ablation_seeds=3),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One continued run from the base: its schedule section, its mixture phases, its description."""

    name: str
    label: str
    schedule: dict
    phases: tuple


def blends(switch_ratio: float = SWITCH_RATIO) -> tuple:
    """The recipe's data: the General Blend, then the QA Blend once the LR reaches start x ratio."""
    return (dict(weights=GENERAL_BLEND), dict(weights=QA_BLEND, start_at=dict(lr_ratio=switch_ratio)))


def variants(meta: dict, steps: int) -> dict[str, Variant]:
    """Every continued run the demo knows; `meta` is the base checkpoint's metadata (its LRs)."""
    start, peak = meta["lr_min"], meta["lr_max"]
    recipe = dict(name="recipe", final_ratio=FINAL_RATIO)
    warm = max(1, steps // 10)

    def rewarm(to: float) -> dict:
        return dict(name="rewarm", peak_lr=to, min_lr=start * FINAL_RATIO, warmup_steps=warm)

    out = [
        Variant("baseline", "A only (the pretraining data), the recipe's LR schedule", recipe, (dict(weights=A_ONLY),)),
        Variant("recipe", "cosine from the base's final LR to 1/100 of it; General Blend (A+B), QA Blend (A+B+qa) "
                "from LR start/5", recipe, blends()),
        Variant("rewarm", f"warmup ({warm} steps) back to the base's peak LR, cosine to start/100; the recipe's data",
                rewarm(peak), blends()),
        *(Variant(f"switch_{d}", f"the recipe with the QA Blend from LR start/{d}", recipe, blends(1.0 / d))
          for d in (2, 10, 50)),
        *(Variant(f"floor_{tag}", f"the recipe with the cosine down to {tag.replace('pct', '%')} of the start",
                  dict(name="recipe", final_ratio=ratio), blends())
          for tag, ratio in (("10pct", 0.1), ("0.1pct", 0.001))),
        Variant("warmup_2x", f"warmup ({warm} steps) to 2x the base's final LR, cosine to start/100; the recipe's "
                "data", rewarm(2 * start), blends()),
    ]
    return {v.name: v for v in out}


@dataclasses.dataclass(frozen=True)
class Question:
    """One of the paper's findings, answered by comparing its choice with the alternatives."""

    key: str
    title: str
    paper: str
    choice: str  # the variant with the paper's setting
    choice_label: str  # the paper's setting, in the question's terms
    alternatives: dict[str, str]  # variant -> its setting, in the question's terms


QUESTIONS = (
    Question("recipe", "The recipe against continuing on the pretraining data",
             "+9% average accuracy over continuing on the pretraining data", "recipe", "the recipe's blends",
             {"baseline": "A only"}),
    Question("switch", "Where to switch to the QA Blend",
             "switching at LR start/5 is best of start/2, /5, /10, /50", "recipe", "start/5",
             {"switch_2": "start/2", "switch_10": "start/10", "switch_50": "start/50"}),
    Question("floor", "How far the cosine decays",
             "decaying to 1% of the start is best of 10%, 1%, 0.1%", "recipe", "1%",
             {"floor_10pct": "10%", "floor_0.1pct": "0.1%"}),
    Question("warmup", "Warmup", "every warmup is worse than none", "recipe", "no warmup",
             {"rewarm": "warmup to the base's peak LR", "warmup_2x": "warmup to 2x the base's final LR"}),
)
MAIN = ("baseline", "recipe", "rewarm")
ABLATIONS = tuple(q.key for q in QUESTIONS[1:])


def run_names(ablations: tuple[str, ...]) -> list[str]:
    """The runs of the main comparison and of the given ablations, each once, in table order."""
    names = list(MAIN)
    for q in QUESTIONS:
        if q.key in ablations:
            names += [n for n in (q.choice, *q.alternatives) if n not in names]
    return names


@dataclasses.dataclass(frozen=True)
class Data:
    tokenizer: str
    sources: dict[str, str]  # name -> prepared directory
    tasks: dict[str, str]  # name -> task file


def prepare_data(seed_dir: str, s: Scale, seed: int, say: Callable[[str], None]) -> Data:
    """Corpus, tokenizer and prepared sources of one seed (each made only when absent)."""
    from cpt_jax.data.packing import prepare
    from cpt_jax.data.tokenization import load_tokenizer, resolve_bos, train_sentencepiece

    corpus_dir = os.path.join(seed_dir, "corpus")
    paths = corpus_lib.paths(corpus_dir)
    generated = corpus_lib.generate(seed, people_a=s.people_a, people_b=s.people_b,
                                    bios_per_person=s.bios_per_person, val_bios=s.val_bios)
    documents = corpus_lib.source_documents(generated)
    if not all(os.path.exists(p) for p in paths.values()):
        corpus_lib.write(generated, corpus_dir)
        say(f"corpus: {s.people_a} + {s.people_b} people, {len(generated.qa_train)} QA pairs -> {corpus_dir}")
    tok_path = os.path.join(seed_dir, "tokenizer.model")
    if not os.path.exists(tok_path):
        train_sentencepiece(generated.training_texts(), tok_path, s.vocab_size, model_type="bpe",
                            byte_fallback=False, num_threads=2)
    tok = load_tokenizer(tok_path)
    marks = 1 + resolve_bos("auto", tok)  # EOS after every document, BOS before it when prepare adds one
    sources = {}
    for name in SOURCES:
        out = sources[name] = os.path.join(seed_dir, "prepared", name)
        if os.path.exists(os.path.join(out, "manifest.json")):
            continue
        docs, val_docs = documents[name]
        counts = [len(ids) + marks for ids in tok.encode_batch(docs)]
        val = corpus_lib.validation_examples(counts, val_docs, s.seq_len + 1)
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            prepare([f"jsonl:{paths[name]}"], tok_path, s.seq_len, out, val_examples=val, workers=1, name=name)
    return Data(tok_path, sources, {name: paths[name] for name in TASKS})


def _config_text(s: Scale, data: Data, seed: int, steps: int, schedule: dict, phases: tuple, init_from: str,
                 evals: int) -> str:
    return f'''"""Written by cpt_jax.demo: python -m cpt_jax.train --config THIS_FILE --workdir THIS_DIRECTORY"""
from cpt_jax.presets import preset_config


def get_config():
    c = preset_config("tiny")
    c.seed = {seed}
    c.model.update({dict(dict(dtype="float32"), **s.model, vocab_size=s.vocab_size, max_seq_len=s.seq_len)!r})
    c.train.update(steps={steps}, batch_size={s.batch_size}, seq_len={s.seq_len}, log_every_steps=1)
    c.schedule.update({schedule!r})
    c.checkpoint.update(every_steps={steps}, max_to_keep=1)
    c.tensorboard = False
    c.init_from = {init_from!r}
    c.data.kind = "mixture"
    c.data.tokenizer = {data.tokenizer!r}
    c.data.sources.update({data.sources!r})
    c.data.phases = {phases!r}
    c.eval.every_steps = {steps // evals if evals else 0}
    c.eval.examples_per_source = {s.eval_examples}
    c.eval.batch_size = {max(8, s.batch_size)}
    return c
'''


def _records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _trained(workdir: str, steps: int) -> bool:
    """Whether the run's final checkpoint (step `steps`) is there."""
    try:
        return checkpoint.read_metadata(os.path.join(workdir, "checkpoints")).get("step") == steps
    except ConfigError:
        return False


@contextlib.contextmanager
def _quiet(log_path: str):
    """The trainer's and evaluator's lines go to the run's log; the demo prints its own."""
    with open(log_path, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        yield


def _fail(what: str, log_path: str, status: int) -> RuntimeError:
    with open(log_path) as f:
        tail = "".join(f.readlines()[-5:])
    return RuntimeError(f"{what} failed with status {status}; the end of {log_path}:\n{tail}")


def train_run(workdir: str, s: Scale, data: Data, seed: int, steps: int, schedule: dict, phases: tuple,
              init_from: str = "", evals: int = RUN_EVALS) -> bool:
    """Train one run (its plan first; `evals` evaluations in the loop), then score its validation
    sources and tasks question by question; False when both were already done. A run trained
    before with another config is a ConfigError naming its config file."""
    from cpt_jax import cli, evaluate, plan, train

    scores = os.path.join(workdir, "tasks.json")
    cfg_file = os.path.join(workdir, "demo_config.py")
    text = _config_text(s, data, seed, steps, schedule, phases, init_from, evals)
    trained = _trained(workdir, steps)
    if trained:
        with open(cfg_file) if os.path.exists(cfg_file) else contextlib.nullcontext(None) as f:
            if f is None or f.read() != text:
                raise ConfigError(f"--workdir: {cfg_file} was trained with another config; use another --workdir")
        if os.path.exists(scores):
            return False
    log_path = os.path.join(workdir, "run.log")
    if not trained:
        os.makedirs(workdir, exist_ok=True)
        with open(cfg_file, "w") as f:
            f.write(text)
        cfg, _ = cli.parse(["plan", f"--config={cfg_file}"])
        with open(os.path.join(workdir, "plan.json"), "w") as f:
            planned = plan.make_plan(cfg)
            json.dump({"switch_step": planned["phases"][1]["start_step"] if len(planned["phases"]) > 1 else None,
                       "tokens_per_source": planned["tokens_per_source"], "warnings": planned["warnings"]}, f)
        with _quiet(log_path):
            status = train.main(["train", f"--config={cfg_file}", f"--workdir={workdir}"])
        if status:
            raise _fail(f"training in {workdir}", log_path, status)
    tasks = ",".join(f"{name}={path}" for name, path in data.tasks.items())
    # The evaluator poses the questions as the run's documents began (--bos auto), like the trainer's.
    with _quiet(log_path):
        status = evaluate.main(["--checkpoint", os.path.join(workdir, "checkpoints"), "--tasks", tasks,
                                "--batch_size", str(TASK_BATCH), "--out", scores, "--log_samples"])
    if status:
        raise _fail(f"evaluating {workdir}", log_path, status)
    return True


def run_base(seed_dir: str, s: Scale, data: Data, seed: int) -> bool:
    """Pretrain the base on A: warmup (a tenth of the steps) and cosine from peak_lr to min_lr."""
    schedule = dict(name="warmup_cosine", peak_lr=s.peak_lr, min_lr=s.min_lr, warmup_steps=max(1, s.base_steps // 10))
    return train_run(os.path.join(seed_dir, "base"), s, data, seed, s.base_steps, schedule, (dict(weights=A_ONLY),),
                     evals=BASE_EVALS)


def run_variant(seed_dir: str, s: Scale, data: Data, seed: int, v: Variant) -> bool:
    return train_run(os.path.join(seed_dir, "runs", v.name), s, data, seed, s.run_steps, v.schedule, v.phases,
                     os.path.join(seed_dir, "base", "checkpoints"))


@dataclasses.dataclass
class RunResult:
    """What one finished run measured; `facts` is the (name, attribute) each question asks, in task
    file order, and the planned_* fields come from `cpt_jax.plan`."""

    losses: dict[str, float]
    curve: list[tuple[int, float]]  # (step, validation loss on A) of every evaluation in the loop
    correct: dict[str, list[bool]]
    facts: dict[str, list[tuple[str, str]]]
    planned_switch: int | None
    actual_switch: int | None  # the trainer's own plan record
    tokens: dict[str, int]
    planned_tokens: dict[str, int]
    warnings: list[str]
    params: int  # the model's parameters (the trainer's plan record)
    first_lr: float
    last_lr: float


def _facts(task_file: str) -> dict[int, tuple[str, str]]:
    """{line: (name, attribute)} of a demo task file."""
    with open(task_file) as f:
        return {i: (r["name"], r["attribute"]) for i, r in enumerate(map(json.loads, f), start=1)}


def load_result(workdir: str, steps: int, task_files: dict[str, str]) -> RunResult:
    """What the finished run in `workdir` recorded; `task_files` are its tasks ({name: file})."""
    if not _trained(workdir, steps):
        raise RuntimeError(f"{workdir}: no checkpoint at step {steps}")
    records = _records(workdir)
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    trainer_plan = [r for r in records if r.get("kind") == "plan"]
    phases = trainer_plan[-1]["phases"] if trainer_plan else []
    evals = sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])
    with open(os.path.join(workdir, "tasks.json")) as f:
        scored = json.load(f)
    with open(os.path.join(workdir, "plan.json")) as f:
        planned = json.load(f)
    tasks, nan = scored["tasks"], math.nan
    facts = {name: _facts(task_files[name]) for name in TASKS}
    return RunResult(
        losses={name: r.get("loss", nan) for name, r in (scored.get("sources") or {}).items()},
        curve=[(r["step"], r["sources"]["A"]["loss"]) for r in evals if "A" in (r.get("sources") or {})],
        correct={name: [bool(q["correct"]) for q in tasks[name]["samples"]] for name in TASKS},
        facts={name: [facts[name][q["line"]] for q in tasks[name]["samples"]] for name in TASKS},
        planned_switch=planned["switch_step"],
        actual_switch=phases[1]["start_step"] if len(phases) > 1 else None,
        tokens={k: int(v) for k, v in (train[-1]["tokens_per_source"] if train else {}).items()},
        planned_tokens={k: int(v) for k, v in planned["tokens_per_source"].items()},
        warnings=list(planned.get("warnings") or []),
        params=int(trainer_plan[-1]["params"]) if trainer_plan else 0,
        first_lr=train[0]["lr"] if train else nan,
        last_lr=train[-1]["lr"] if train else nan,
    )
