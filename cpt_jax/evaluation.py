"""A run's periodic evaluation: `from_config` builds it from the run's config (what the trainer
calls) out of the sources and tasks (`scoring`) and the greedy continuations of
`eval.sample_prompts` (`decode.SampleEvaluator`); `eval_record` makes its metrics.jsonl record."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cpt_jax import decode
from cpt_jax.config import ConfigError
from cpt_jax.data import sources as sources_lib
from cpt_jax.data.tokenization import load_tokenizer
from cpt_jax.model import ModelConfig
from cpt_jax.scoring import SourceEvaluator, TaskEvaluator

Log = Callable[[str], None]


def eval_record(step: int, sources_result: Mapping[str, Mapping[str, Any]] | None,
                tasks_result: Mapping[str, Mapping[str, Any]] | None,
                samples: Sequence[Mapping[str, str]] | None = None) -> dict[str, Any]:
    """The metrics.jsonl record of one evaluation:
    {"kind": "eval", "step", "sources": {name: {loss, perplexity, bits_per_byte}},
     "tasks": {name: {acc, acc_norm, n}}}, plus "samples": [{prompt, continuation}] when there are
    sample prompts."""

    def num(x):
        return None if x is None else float(x)

    extra = {"samples": [{"prompt": str(r["prompt"]), "continuation": str(r["continuation"])} for r in samples]
             } if samples else {}
    return {
        "kind": "eval",
        "step": int(step),
        "sources": {str(n): {k: num(r[k]) for k in ("loss", "perplexity", "bits_per_byte")}
                    for n, r in (sources_result or {}).items()},
        "tasks": {str(n): {"acc": float(r["acc"]), "acc_norm": float(r["acc_norm"]), "n": int(r["n"])}
                  for n, r in (tasks_result or {}).items()},
        **extra,
    }


@dataclasses.dataclass
class Evaluation:
    """The periodic evaluation of a run: `due(step)` says when, `run(params, step)` does it."""

    every_steps: int
    sources: SourceEvaluator | None
    tasks: TaskEvaluator | None
    samples: decode.SampleEvaluator | None = None  # eval.sample_prompts, continued greedily

    def due(self, step: int) -> bool:
        """True when the parameters after `step` optimizer steps should be evaluated."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def run(self, params: Any, step: int, log: Log | None = None) -> dict[str, Any]:
        """Evaluate and return the metrics.jsonl record (see eval_record)."""
        s = self.sources.evaluate(params, log) if self.sources is not None else {}
        t = self.tasks.evaluate(params, log) if self.tasks is not None else {}
        return eval_record(step, s, t, self.samples.evaluate(params) if self.samples is not None else None)


def from_config(cfg: Any, model_config: ModelConfig, *, mesh: Any = None, rules: Any = None,
                log: Log | None = None) -> Evaluation | None:
    """The run's Evaluation, or None when eval.every_steps is 0: the val splits of data.sources
    (mixture runs; one without a val split is skipped with a note) and of eval.sources (eval-only,
    e.g. the pretraining data watched for forgetting), eval.tasks and eval.sample_prompts tokenized
    with data.tokenizer, at train.seq_len. ConfigError for any bad input: every check happens here,
    before anything is compiled."""
    e = cfg.eval
    every = e.every_steps
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"eval.every_steps: {every!r}, expected 0 (no evaluation) or a positive integer")
    if every == 0:
        return None
    data_sources = dict(cfg.data.sources) if cfg.data.kind == "mixture" else {}
    manifests = {name: sources_lib.read_manifest(directory) for name, directory in data_sources.items()}
    sources: dict[str, str] = {}
    for name, manifest in manifests.items():
        if manifest["val_examples"] > 0:
            sources[name] = data_sources[name]
        elif log is not None:
            log(f"note: data.sources.{name} has no val split; it is not evaluated")
    for name, directory in dict(e.sources).items():
        if name in data_sources:
            raise ConfigError(f"eval.sources.{name}: also a name in data.sources, expected a distinct name")
        if not isinstance(directory, str) or not directory:
            raise ConfigError(f"eval.sources.{name}: {directory!r}, expected a prepared directory")
        sources[name] = directory
    task_specs = e.tasks.to_dict() if hasattr(e.tasks, "to_dict") else dict(e.tasks)
    prompts = list(e.sample_prompts)
    if not sources and not task_specs and not prompts:
        raise ConfigError(f"eval.every_steps: {every} with nothing to evaluate, expected data.kind 'mixture' "
                          "(its sources' val splits), eval.sources, eval.tasks or eval.sample_prompts")
    tok = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    common = dict(batch_size=e.batch_size, seq_len=cfg.train.seq_len, mesh=mesh, rules=rules,
                  chunk_tokens=cfg.train.loss_chunk_tokens)
    # Prompts begin the way the training documents do (with BOS when prepare added it).
    add_bos = sources_lib.starts_with_bos([(data_sources[n], m) for n, m in manifests.items()])
    source_eval = task_eval = samples = None
    if sources:
        source_eval = SourceEvaluator(sources, model_config, examples_per_source=e.examples_per_source,
                                      tokenizer_fingerprint=tok.fingerprint if tok is not None else None, **common)
    if task_specs:
        if tok is None:
            raise ConfigError("eval.tasks: no tokenizer to tokenize the questions, expected data.tokenizer to name "
                              "the model's tokenizer file")
        task_eval = TaskEvaluator(task_specs, tok, model_config, add_bos=add_bos, **common)
    if prompts:
        if tok is None:
            raise ConfigError("eval.sample_prompts: no tokenizer to tokenize the prompts, expected data.tokenizer to "
                              "name the model's tokenizer file")
        samples = decode.SampleEvaluator(prompts, tok, model_config, max_new_tokens=e.sample_max_new_tokens,
                                         mesh=mesh, rules=rules, add_bos=add_bos)
    return Evaluation(every, source_eval, task_eval, samples)
