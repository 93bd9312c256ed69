"""Evaluation: validation loss, perplexity and bits per byte per source; multiple-choice tasks.

    python -m cpt_jax.evaluate --checkpoint DIR [--sources name=prepared_dir,...] \\
        [--tasks name=file.jsonl,...] [--out results.json] [--batch_size N] [--seq_len N] \\
        [--examples_per_source N] [--tokenizer FILE] [--fewshot K] [--template T] [--bos auto|always|never] \\
        [--dtype float32] [--log_samples]

Parameters are restored sharded (FSDP) over every local device. User errors print one line,
`error: ...`, and exit with status 2; a progress line per source and task goes to stderr.

Sources (`SourceEvaluator`): the first `examples_per_source` examples of each prepared source's
`val` split (all of them when it holds fewer), the same examples at every evaluation so that
curves are comparable. Attention is masked per document exactly as in training (segment ids from
the EOS tokens) and every position counts, so the eval loss of a training source is the training
loss on held-out data. Reported per source:
  * loss: mean next-token negative log-likelihood in nats;
  * perplexity: exp(loss);
  * bits_per_byte: (summed NLL / ln 2) / bytes, where bytes = tokens evaluated * the manifest's
    `bytes_per_token` (UTF-8 bytes of the source's text / its tokens). The byte count is an
    estimate from the source's average, not the exact bytes of the evaluated examples; it makes
    models with different tokenizers comparable. None when the manifest has no bytes_per_token.
  * tokens: the number of predicted tokens.

Tasks (`TaskEvaluator`, formats in `cpt_jax.tasks`): each choice is scored by the summed
log-likelihood of its tokens given the prompt. The prompt and prompt+choice are tokenized
separately (as lm-eval-harness does); the tokens of prompt+choice past the prompt's token count
are the choice's. `add_bos` puts the tokenizer's BOS first, so that questions begin the way the
training documents did: the in-loop evaluation and the command line (`--bos auto`, the default)
do when the run's data sources were prepared with BOS (their manifests' `add_bos`); a checkpoint
whose config names no source found on disk (an import) follows the tokenizer's own convention, as
`prepare --bos auto` does. An empty prompt without BOS is preceded by EOS, the document
separator. A sequence longer than seq_len + 1 tokens loses tokens from the left of its context.
`acc` is the fraction of questions where the highest sum is the gold choice; `acc_norm` the same
with each sum divided by the choice's length in UTF-8 bytes. Ties go to the first choice.
`--log_samples` adds, per question, the choices' log-likelihoods, the prediction and the gold to
the --out JSON (what paired comparisons of two checkpoints on the same questions need).

Both evaluators read and tokenize everything once, into numpy rows, at construction (that is
where every input error surfaces); each call puts the fixed batches on the devices (with the
batch sharding when given), the last one padded with rows whose loss mask is 0, and runs one
jitted function that returns each row's summed NLL. The row sums are added in float64 on the
host, so the result does not depend on the mesh or the batch size (beyond float32 rounding of
each row). Sources share one compiled program ([batch_size, seq_len]); a task runs at the next
power of two (>= 16, <= seq_len) above its longest row, compiled once per such length.

`from_config` builds both from a run's config (what the trainer calls), with the greedy
continuations of `eval.sample_prompts` (cpt_jax.decode.SampleEvaluator) when there are any;
`eval_record` makes the metrics.jsonl record.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cpt_jax import decode, losses, model, sharding
from cpt_jax import tasks as tasks_lib
from cpt_jax.config import ConfigError
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.model import ModelConfig

LN2 = math.log(2.0)
Log = Callable[[str], None]
MIN_TASK_LENGTH = 16


# ----------------------------------------------------------------------------------------------
# Shared machinery: one jitted "summed NLL per row" function, fixed-shape batches
# ----------------------------------------------------------------------------------------------


def _positive(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{key}: {value!r}, expected a positive integer")
    return int(value)


def _rules_tuple(rules: Any) -> tuple:
    """Rules as the model takes them (a sorted tuple of pairs) from a dict, a tuple or None."""
    if not rules:
        return ()
    if isinstance(rules, Mapping):
        return sharding.rules_tuple(dict(rules))
    return tuple(rules)


def _batch_ways(batch_sharding: Any) -> int:
    """How many ways a sharding splits the batch dimension."""
    if isinstance(batch_sharding, jax.sharding.NamedSharding):
        spec = batch_sharding.spec
        axes = spec[0] if len(spec) else None
        if axes is None:
            return 1
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(batch_sharding.mesh.shape[a] for a in axes)
    return len(batch_sharding.device_set)


class _Runner:
    """Device placement shared by both evaluators: mesh, rules, batch sharding, jitted steps."""

    def __init__(self, model_config: ModelConfig, batch_size: int, mesh: Any, rules: Any, batch_sharding: Any,
                 chunk_tokens: int, key: str):
        self.model_config = model_config
        self.batch_size = batch_size
        self.mesh = mesh
        if mesh is not None and rules is None:
            rules = sharding.DEFAULT_RULES
        self.rules = _rules_tuple(rules)
        if batch_sharding is None and mesh is not None:
            batch_sharding = sharding.batch_sharding(mesh, dict(self.rules) or sharding.DEFAULT_RULES)
        self.batch_sharding = batch_sharding
        self.chunk_tokens = int(chunk_tokens or 0)
        if batch_sharding is not None:
            ways = _batch_ways(batch_sharding)
            if batch_size % ways:
                raise ConfigError(f"{key}: {batch_size}, expected a multiple of the {ways} devices the eval batch "
                                  "is split over")
        out = None
        if isinstance(batch_sharding, jax.sharding.NamedSharding):
            # Every process reads the per-row sums, so they come back replicated.
            out = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
        self._out_sharding = out

    def step(self, length: int) -> Callable:
        """The jitted (params, batch) -> summed NLL of each row [B] for rows of `length` tokens."""
        chunk = self.chunk_tokens if 0 < self.chunk_tokens < length and length % self.chunk_tokens == 0 else 0
        return _row_nll_step(self.model_config, self.rules, chunk, self._out_sharding)

    def context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays (the same on every process) -> device arrays with the batch sharding."""
        if self.batch_sharding is None:
            return jax.device_put(batch)
        return {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda idx, v=v: v[idx])
                for k, v in batch.items()}

    def row_nll(self, params: Any, rows: int, length: int, batch: Callable[[int, int], dict]) -> np.ndarray:
        """Summed NLL (float64) of `rows` rows (a multiple of the batch size) of `length` tokens;
        batch(lo, hi) gives the host arrays of rows [lo, hi)."""
        step = self.step(length)
        B = self.batch_size
        outs = []
        with self.context():
            for lo in range(0, rows, B):  # every batch is dispatched before any result is read
                outs.append(step(params, self.put(batch(lo, lo + B))))
            return np.concatenate([np.asarray(jax.device_get(o), np.float64) for o in outs])


@functools.lru_cache(maxsize=32)
def _row_nll_step(c: ModelConfig, rules: tuple, chunk_tokens: int, out_sharding: Any) -> Callable:
    """One jitted function per (model, rules, loss chunk, output sharding), shared by all evaluators."""

    def step(params, batch):
        hidden = model.forward(params, batch["inputs"], c, batch["segment_ids"], batch["positions"], rules)
        w = model.head_weights(params, c)

        def row(h, t, m):
            return losses.cross_entropy_sum(h[None], w, t[None], m[None], c.dtype, chunk_tokens)

        return jax.vmap(row)(hidden, batch["targets"], batch["loss_mask"])

    return jax.jit(step, out_shardings=out_sharding)


def _empty_rows(rows: int, length: int) -> dict[str, np.ndarray]:
    """Padding: token 0, segment 0, positions 0..length-1, loss mask 0."""
    arrays = {k: np.zeros((rows, length), dt) for k, dt in pipeline_lib.BATCH_DTYPES.items()}
    arrays["positions"][:] = np.arange(length, dtype=np.int32)
    return arrays


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def source_metrics(nll_sum: float, tokens: int, bytes_per_token: float | None) -> dict[str, Any]:
    """{loss, perplexity, bits_per_byte, tokens} from a summed NLL (nats) over `tokens` tokens."""
    loss = float(nll_sum) / tokens
    perplexity = math.inf if loss >= 700 else math.exp(loss)  # NaN stays NaN
    bpb = float(nll_sum) / LN2 / (tokens * bytes_per_token) if bytes_per_token else None
    return {"loss": loss, "perplexity": perplexity, "bits_per_byte": bpb, "tokens": int(tokens)}


@dataclasses.dataclass
class _SourceSet:
    name: str
    directory: str
    examples: int
    tokens: int
    bytes_per_token: float | None
    arrays: dict[str, np.ndarray]


class SourceEvaluator:
    """Validation loss, perplexity and bits per byte of prepared sources (see the module docstring).

    Args:
      sources: {name: prepared directory}; each needs a non-empty val split.
      model_config: the model's architecture (vocab_size bounds the sources' token ids).
      examples_per_source: the first this many val examples of each source are evaluated.
      batch_size: rows per eval batch (a multiple of the devices the batch is split over).
      seq_len: the eval length; a source prepared with a shorter seq_len is padded (masked), a
        longer one is an error. At most model_config.max_seq_len.
      mesh, rules, batch_sharding: placement as in training (rules: a dict or the model's tuple;
        batch_sharding defaults to the mesh's batch sharding). None: the default device.
      chunk_tokens: the cross-entropy chunk of train.loss_chunk_tokens (0: whole sequence).
      tokenizer_fingerprint: when given, sources prepared with another tokenizer are refused.
    Raises ConfigError for a missing or incompatible source or a bad setting.
    """

    def __init__(self, sources: Mapping[str, str], model_config: ModelConfig, *, examples_per_source: int,
                 batch_size: int, seq_len: int, mesh: Any = None, rules: Any = None, batch_sharding: Any = None,
                 chunk_tokens: int = 0, tokenizer_fingerprint: str | None = None):
        self.examples_per_source = _positive("eval.examples_per_source", examples_per_source)
        self.batch_size = _positive("eval.batch_size", batch_size)
        self.seq_len = _positive("eval seq_len", seq_len)
        if self.seq_len > model_config.max_seq_len:
            raise ConfigError(f"eval seq_len: {seq_len}, expected at most model.max_seq_len {model_config.max_seq_len}")
        self.model_config = model_config
        self._runner = _Runner(model_config, self.batch_size, mesh, rules, batch_sharding, chunk_tokens,
                               "eval.batch_size")
        self.sets = {str(name): self._load(str(name), directory, tokenizer_fingerprint)
                     for name, directory in sources.items()}

    @property
    def names(self) -> list[str]:
        return list(self.sets)

    def _load(self, name: str, directory: Any, fingerprint: str | None) -> _SourceSet:
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ConfigError(f"source {name}: {directory!r}, expected a prepared directory")
        src = sources_lib.load_source(directory, split="val")
        m, path = src.manifest, src.manifest_path
        if fingerprint is not None and m["tokenizer_fingerprint"] != fingerprint:
            raise ConfigError(f"{path}: tokenizer_fingerprint {m['tokenizer_fingerprint'][:16]}... (from "
                              f"{m.get('tokenizer_path', '?')}), expected {fingerprint[:16]}... of the model's "
                              "tokenizer (prepare the source again with that tokenizer)")
        if m["vocab_size"] > self.model_config.vocab_size:
            raise ConfigError(f"{path}: vocab_size {m['vocab_size']}, expected at most the model's vocab_size "
                              f"{self.model_config.vocab_size}")
        length = src.seq_len
        if length > self.seq_len:
            raise ConfigError(f"{path}: seq_len {length}, expected at most the eval seq_len {self.seq_len} "
                              "(prepare the source with a shorter --seq_len, or evaluate with a longer one)")
        n = min(self.examples_per_source, src.num_examples)
        # The first n val examples through grain with the trainer's batch fields (segments from EOS).
        fields = src.dataset[:n].batch(n).map(pipeline_lib.BatchFields(int(m["eos_id"])))[0]
        arrays = _empty_rows(_round_up(n, self.batch_size), self.seq_len)
        for key, value in fields.items():
            arrays[key][:n, :length] = value
        bpt = m.get("bytes_per_token")
        bpt = float(bpt) if isinstance(bpt, (int, float)) and not isinstance(bpt, bool) and bpt > 0 else None
        return _SourceSet(name, src.directory, n, n * length, bpt, arrays)

    def evaluate(self, params: Any, log: Log | None = None) -> dict[str, dict[str, Any]]:
        """{name: {loss, perplexity, bits_per_byte, tokens}} of every source for these parameters."""
        results = {}
        for name, s in self.sets.items():
            t0 = time.perf_counter()
            rows, length = s.arrays["inputs"].shape
            batch = lambda lo, hi, a=s.arrays: {k: v[lo:hi] for k, v in a.items()}
            nll = float(self._runner.row_nll(params, rows, length, batch).sum())
            r = results[name] = source_metrics(nll, s.tokens, s.bytes_per_token)
            if log is not None:
                bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
                log(f"eval source {name}: loss {r['loss']:.4f} perplexity {r['perplexity']:.3f} bits/byte {bpb} "
                    f"({s.examples} examples, {s.tokens} tokens, {time.perf_counter() - t0:.1f}s)")
        return results


# ----------------------------------------------------------------------------------------------
# Multiple-choice tasks
# ----------------------------------------------------------------------------------------------


def choice_predictions(logliks: Sequence[Sequence[float]],
                       choice_bytes: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The predicted choice of every question: the highest summed log-likelihood (divided by the
    choice's UTF-8 length when `choice_bytes` is given: acc_norm's prediction); ties go to the first."""
    if choice_bytes is None:
        return [int(np.argmax(np.asarray(ll, np.float64))) for ll in logliks]
    return [int(np.argmax(np.asarray(ll, np.float64) / np.maximum(np.asarray(nbytes, np.float64), 1.0)))
            for ll, nbytes in zip(logliks, choice_bytes, strict=True)]


def choice_metrics(logliks: Sequence[Sequence[float]], choice_bytes: Sequence[Sequence[int]],
                   golds: Sequence[int]) -> tuple[float, float]:
    """(acc, acc_norm) of questions given each choice's summed log-likelihood and UTF-8 length."""
    return _accuracy(choice_predictions(logliks), golds), _accuracy(choice_predictions(logliks, choice_bytes), golds)


def _accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(predictions, golds, strict=True)) / len(golds) if golds else 0.0


def _bucket(longest: int, seq_len: int, chunk_tokens: int) -> int:
    """The padded length of a task: a power of two >= longest (a multiple of the loss chunk when
    longer than it), at most seq_len."""
    length = max(MIN_TASK_LENGTH, 1 << max(0, longest - 1).bit_length())
    if chunk_tokens and length > chunk_tokens:
        length = _round_up(length, chunk_tokens)
    return min(length, seq_len)


@dataclasses.dataclass
class _TaskSet:
    """A task's rows (one per question and choice, question by question), kept compact: the token
    sequences [padded rows, length + 1], their lengths and first scored token; batches are made
    from them on the fly."""

    task: tasks_lib.Task
    length: int
    rows: int  # real rows
    offsets: np.ndarray  # [questions + 1] first row of each question
    golds: list[int]
    choice_bytes: list[list[int]]
    truncated: int  # rows whose context lost tokens on the left
    tokens: np.ndarray  # int32 [padded rows, length + 1], 0 after each sequence
    lengths: np.ndarray  # int64 [padded rows], 0 for padding rows
    starts: np.ndarray  # int64 [padded rows], index of the first scored token of each sequence

    def batch(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        tokens, n = self.tokens[lo:hi], hi - lo
        cols = np.arange(self.length)[None]
        real = cols < (self.lengths[lo:hi] - 1)[:, None]  # input positions holding a token
        scored = real & (cols >= (self.starts[lo:hi] - 1)[:, None])  # target j is token j + 1
        return {
            "inputs": np.ascontiguousarray(tokens[:, :-1]),
            "targets": np.ascontiguousarray(tokens[:, 1:]),
            "segment_ids": real.astype(np.int32),
            "positions": np.broadcast_to(cols, (n, self.length)).astype(np.int32),
            "loss_mask": scored.astype(np.float32),
        }


class TaskEvaluator:
    """Multiple-choice accuracy (`acc`, `acc_norm`) by log-likelihood; see the module docstring.

    Args:
      tasks: {name: task}, each a task file path, a spec mapping for `tasks.task_from_spec`
        ({path, fewshot, fewshot_path, template, seed}) or a loaded `tasks.Task`.
      tokenizer: a `Tokenizer` or the path of a tokenizer file.
      model_config: the model's architecture.
      seq_len: the longest scored sequence (prompt + choice, inputs); at most max_seq_len.
      batch_size: rows (question-choice pairs) per batch.
      mesh, rules, batch_sharding, chunk_tokens: as for SourceEvaluator.
      add_bos: put the tokenizer's BOS token before every prompt (models trained with one).
    Raises ConfigError for a bad task file or setting.
    """

    def __init__(self, tasks: Mapping[str, Any], tokenizer: Any, model_config: ModelConfig, *, seq_len: int,
                 batch_size: int, mesh: Any = None, rules: Any = None, batch_sharding: Any = None,
                 chunk_tokens: int = 0, add_bos: bool = False):
        from cpt_jax.data.tokenization import load_tokenizer

        self.seq_len = _positive("eval seq_len", seq_len)
        if self.seq_len > model_config.max_seq_len:
            raise ConfigError(f"eval seq_len: {seq_len}, expected at most model.max_seq_len {model_config.max_seq_len}")
        self.batch_size = _positive("eval.batch_size", batch_size)
        self.tokenizer = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path}: {self.tokenizer.vocab_size} tokens, expected at most "
                              f"the model's vocab_size {model_config.vocab_size}")
        if add_bos and self.tokenizer.bos_id is None:
            raise ConfigError(f"add_bos: tokenizer {self.tokenizer.path} has no BOS token, expected one")
        self.add_bos = bool(add_bos)
        self.model_config = model_config
        self._runner = _Runner(model_config, self.batch_size, mesh, rules, batch_sharding, chunk_tokens,
                               "eval.batch_size")
        self.sets = {str(name): self._build(tasks_lib.task_from_spec(str(name), spec))
                     for name, spec in tasks.items()}

    @property
    def names(self) -> list[str]:
        return list(self.sets)

    def _sequences(self, task: tasks_lib.Task) -> tuple[list[list[int]], list[int], int]:
        """Token sequences (prompt + choice) of every row, the index of each one's first scored
        token, and how many were truncated on the left."""
        tok = self.tokenizer
        requests = task.requests()
        prompts = tok.encode_batch([p for p, _ in requests])
        wholes = iter(tok.encode_batch([p + c for p, conts in requests for c in conts]))
        prefix = [int(tok.bos_id)] if self.add_bos else []
        limit = self.seq_len + 1
        seqs, starts, truncated = [], [], 0
        for (_, conts), prompt_ids in zip(requests, prompts, strict=True):
            k = len(prompt_ids)
            for cont in conts:
                whole = [int(t) for t in next(wholes)]
                context, choice = whole[:k], whole[k:]
                if not choice:  # the choice merged into the prompt's last token: score it on its own
                    context, choice = [int(t) for t in prompt_ids], [int(t) for t in tok.encode_batch([cont])[0]]
                context = prefix + context or [int(tok.eos_id)]
                seq = context + choice
                start = len(context)
                if len(seq) > limit:
                    drop = len(seq) - limit
                    seq, start = seq[drop:], max(start - drop, 1)
                    truncated += 1
                seqs.append(seq)
                starts.append(start)
        return seqs, starts, truncated

    def _build(self, task: tasks_lib.Task) -> _TaskSet:
        seqs, starts, truncated = self._sequences(task)
        length = _bucket(max(len(s) - 1 for s in seqs), self.seq_len, self._runner.chunk_tokens)
        padded = _round_up(len(seqs), self.batch_size)
        tokens = np.zeros((padded, length + 1), np.int32)
        lengths, first = np.zeros(padded, np.int64), np.zeros(padded, np.int64)
        for r, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            tokens[r, :len(seq)] = seq
            lengths[r], first[r] = len(seq), start
        counts = [len(ex.choices) for ex in task.examples]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        golds = [ex.gold for ex in task.examples]
        nbytes = [[len(c.encode("utf-8")) for c in ex.choices] for ex in task.examples]
        return _TaskSet(task, length, len(seqs), offsets, golds, nbytes, truncated, tokens, lengths, first)

    def loglikelihoods(self, params: Any, name: str) -> list[np.ndarray]:
        """Summed log-likelihood of every choice of every question of task `name`."""
        s = self.sets[name]
        ll = -self._runner.row_nll(params, len(s.tokens), s.length, s.batch)[: s.rows]
        return [ll[s.offsets[q]:s.offsets[q + 1]] for q in range(len(s.golds))]

    def evaluate(self, params: Any, log: Log | None = None, samples: bool = False) -> dict[str, dict[str, Any]]:
        """{name: {acc, acc_norm, n}} of every task for these parameters; with `samples`, also
        `samples`: per question (in file order) its line in the task file, the choices' summed
        log-likelihoods, the predicted choice (acc's), the gold and whether they agree."""
        results = {}
        for name, s in self.sets.items():
            t0 = time.perf_counter()
            logliks = self.loglikelihoods(params, name)
            preds = choice_predictions(logliks)
            acc, acc_norm = _accuracy(preds, s.golds), _accuracy(choice_predictions(logliks, s.choice_bytes), s.golds)
            results[name] = {"acc": acc, "acc_norm": acc_norm, "n": len(s.golds)}
            if samples:
                results[name]["samples"] = [
                    {"line": ex.line, "loglikelihoods": [float(x) for x in ll], "pred": pred, "gold": ex.gold,
                     "correct": pred == ex.gold}
                    for ex, ll, pred in zip(s.task.examples, logliks, preds, strict=True)]
            if log is not None:
                cut = f", {s.truncated} truncated" if s.truncated else ""
                log(f"eval task {name}: acc {acc:.4f} acc_norm {acc_norm:.4f} ({len(s.golds)} questions, "
                    f"{s.rows} choices at length {s.length}{cut}, {time.perf_counter() - t0:.1f}s)")
        return results


# ----------------------------------------------------------------------------------------------
# Records and the trainer's entry point
# ----------------------------------------------------------------------------------------------


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
                batch_sharding: Any = None, tokenizer: Any = None, log: Log | None = None) -> Evaluation | None:
    """The run's Evaluation, or None when eval.every_steps is 0.

    Sources: the val split of every data.sources entry (data.kind 'mixture'; a source prepared
    without a val split is skipped with a note) and every eval.sources entry (eval-only, e.g. the
    pretraining data watched for forgetting). Tasks: eval.tasks, a path or a spec dict per name,
    tokenized with `tokenizer` (a Tokenizer or a path; default data.tokenizer). Lengths follow
    train.seq_len, the loss chunk train.loss_chunk_tokens. Raises ConfigError (all input checks
    happen here, before anything is compiled).
    """
    from cpt_jax.data.tokenization import load_tokenizer

    e = cfg.eval
    every = e.every_steps
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"eval.every_steps: {every!r}, expected 0 (no evaluation) or a positive integer")
    if every == 0:
        return None
    data_sources = dict(cfg.data.sources) if cfg.data.kind == "mixture" else {}
    manifests = {name: sources_lib.read_manifest(directory) for name, directory in data_sources.items()}
    sources: dict[str, str] = {}
    for name, directory in data_sources.items():
        if manifests[name]["val_examples"] <= 0:
            if log is not None:
                log(f"note: data.sources.{name} has no val split; it is not evaluated")
            continue
        sources[name] = directory
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
    tok = tokenizer or cfg.data.tokenizer or None
    if tok is not None and not hasattr(tok, "encode_batch"):
        tok = load_tokenizer(tok)
    common = dict(batch_size=e.batch_size, seq_len=cfg.train.seq_len, mesh=mesh, rules=rules,
                  batch_sharding=batch_sharding, chunk_tokens=cfg.train.loss_chunk_tokens)
    # Prompts begin the way the training documents do (with BOS when prepare added it).
    add_bos = sources_lib.starts_with_bos([(data_sources[n], m) for n, m in manifests.items()])
    source_eval = task_eval = None
    if sources:
        source_eval = SourceEvaluator(sources, model_config, examples_per_source=e.examples_per_source,
                                      tokenizer_fingerprint=tok.fingerprint if tok is not None else None, **common)
    if task_specs:
        if tok is None:
            raise ConfigError("eval.tasks: no tokenizer to tokenize the questions, expected data.tokenizer to name "
                              "the model's tokenizer file")
        task_eval = TaskEvaluator(task_specs, tok, model_config, add_bos=add_bos, **common)
    samples = None
    if prompts:
        if tok is None:
            raise ConfigError("eval.sample_prompts: no tokenizer to tokenize the prompts, expected data.tokenizer to "
                              "name the model's tokenizer file")
        samples = decode.SampleEvaluator(prompts, tok, model_config, max_new_tokens=e.sample_max_new_tokens,
                                         mesh=mesh, rules=dict(_rules_tuple(rules)), add_bos=add_bos)
    return Evaluation(every, source_eval, task_eval, samples)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """{name: path} from 'name=path,name=path' values (the flag may repeat)."""
    out: dict[str, str] = {}
    for value in values or ():
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ConfigError(f"{flag}: {item!r}, expected name=path (comma-separated)")
            if name in out:
                raise ConfigError(f"{flag}: {name!r} given twice, expected distinct names")
            out[name] = path
    return out


def checkpoint_tokenizer(checkpoint_dir: str, meta: dict[str, Any] | None = None) -> str | None:
    """The tokenizer file a checkpoint names, or None: its metadata `tokenizer` (an imported
    model's copy; also looked for in the tokenizer/ directory beside its checkpoints/), else its
    run's config.data.tokenizer, else the same for the checkpoint it was initialised from."""
    from cpt_jax import checkpoint

    path = checkpoint_dir
    for _ in range(8):
        try:
            meta = meta if meta is not None else checkpoint.read_metadata(path)
            root, _ = checkpoint.resolve(path)
        except ConfigError:
            return None
        candidates = []
        own = meta.get("tokenizer")
        if isinstance(own, str) and own:
            candidates += [own, os.path.join(os.path.dirname(root), "tokenizer", os.path.basename(own))]
        data = (meta.get("config") or {}).get("data") or {}
        if isinstance(data.get("tokenizer"), str) and data["tokenizer"]:
            candidates.append(data["tokenizer"])
        for candidate in candidates:
            if os.path.exists(candidate):
                return candidate
        path, meta = meta.get("init_from"), None
        if not path:
            return None
    return None


def checkpoint_sources(meta: dict[str, Any], log: Log | None = None) -> dict[str, str]:
    """The run's data.sources (mixture runs) and eval.sources that exist on disk with a val split."""
    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    named = dict(data.get("sources") or {}) if data.get("kind", "mixture") == "mixture" else {}
    named.update((cfg.get("eval") or {}).get("sources") or {})
    out = {}
    for name, directory in named.items():
        if not isinstance(directory, str):
            continue
        try:
            if sources_lib.read_manifest(directory)["val_examples"] > 0:
                out[name] = directory
                continue
            why = "no val split"
        except ConfigError:
            why = "not found"
        if log is not None:
            log(f"note: source {name} of the checkpoint's config ({directory}): {why}; skipped")
    return out


def checkpoint_bos(meta: dict[str, Any], tok: Any, choice: str = "auto") -> bool:
    """Whether questions to this checkpoint start with BOS for `--bos` `choice`: with 'auto', as
    the documents of its run's data sources did (sources.starts_with_bos over those found on disk,
    what the in-loop evaluation uses), else (an import, sources gone) as `prepare --bos auto` would
    prepare documents for `tok`; 'always' and 'never' as prepare's --bos."""
    from cpt_jax.data.tokenization import resolve_bos

    if choice == "auto":
        data = (meta.get("config") or {}).get("data") or {}
        named = (data.get("sources") or {}) if data.get("kind", "mixture") == "mixture" else {}
        found = []
        for directory in named.values():
            with contextlib.suppress(ConfigError):  # gone: checkpoint_sources notes it
                found.append((directory, sources_lib.read_manifest(directory)))
        if found:
            return sources_lib.starts_with_bos(found)
    return resolve_bos(choice, tok)


def add_bos_and_dtype_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--bos (read by checkpoint_bos) and --dtype, as every command that reads a checkpoint's model
    with its tokenizer takes them (evaluate's questions, sample's prompts)."""
    from cpt_jax.data.tokenization import BOS_CHOICES

    p.add_argument("--bos", default="auto", choices=BOS_CHOICES,
                   help=f"BOS before every {what}: auto (default) as the checkpoint's training sources were "
                        "prepared (their manifests' add_bos; without any on disk, the tokenizer's own convention), "
                        "always, never")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's model.dtype)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cpt_jax.evaluate",
        description="Validation loss/perplexity/bits per byte per source and multiple-choice accuracy of a "
                    "checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a run's workdir, its checkpoints/ directory, a step directory or an imported model")
    p.add_argument("--sources", action="append", metavar="NAME=DIR,...",
                   help="prepared directories whose val split is evaluated (default: the run's sources found "
                        "on disk)")
    p.add_argument("--tasks", action="append", metavar="NAME=FILE,...", help="multiple-choice task files (JSONL)")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows per batch (default: 8, rounded up to a multiple of the devices)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="eval length (default: the longest source's seq_len; for tasks model.max_seq_len)")
    p.add_argument("--examples_per_source", type=int, default=None,
                   help="val examples per source (default: the run's eval.examples_per_source, else 64)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file for --tasks (default: the checkpoint's)")
    p.add_argument("--fewshot", type=int, default=0, help="few-shot examples per prompt for every task")
    p.add_argument("--template", default=None, help="prompt template with a {context} placeholder")
    add_bos_and_dtype_flags(p, "question")
    p.add_argument("--log_samples", action="store_true",
                   help="with --out: every question's choice log-likelihoods, prediction and gold in the JSON")
    return p


def mesh_for(mc: ModelConfig) -> tuple[Any, dict, Any]:
    """(mesh, rules, parameter shardings) over every device: FSDP when the parameters divide,
    else data parallel with replicated parameters."""
    abstract, names = model.abstract_params(mc), model.logical_axes(mc)
    rules = dict(sharding.DEFAULT_RULES)
    for data, fsdp in ((1, -1), (-1, 1)):
        mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1})
        try:
            return mesh, rules, sharding.param_shardings(abstract, names, mesh, rules)
        except ConfigError:
            continue
    raise AssertionError("replicated parameters always fit a data-parallel mesh")


def restore_params(checkpoint_dir: str, meta: dict[str, Any], mc: ModelConfig, shardings: Any) -> Any:
    """The checkpoint's parameters restored with `shardings` (ConfigError naming --checkpoint when
    their shapes differ from the model's or the arrays fail to restore)."""
    from cpt_jax import checkpoint

    abstract = model.abstract_params(mc)
    if isinstance(meta.get("param_shapes"), dict):
        checkpoint.check_param_shapes(meta["param_shapes"], abstract, f"--checkpoint {checkpoint_dir}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        return checkpoint.restore_from(checkpoint_dir, params=target)["params"]
    except ConfigError:
        raise
    except Exception as e:  # orbax: a damaged or incomplete step
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise ConfigError(f"--checkpoint {checkpoint_dir}: the parameters failed to restore ({reason})") from None


def format_table(results: Mapping[str, Any]) -> str:
    """The results as aligned text tables (sources, then tasks)."""
    lines = []
    src, tsk = results.get("sources") or {}, results.get("tasks") or {}
    width = max([len(n) for n in (*src, *tsk)] + [6])
    if src:
        lines.append(f"{'source':<{width}}  {'loss':>8}  {'perplexity':>10}  {'bits/byte':>9}  {'tokens':>9}")
        for name, r in src.items():
            bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
            lines.append(f"{name:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {bpb:>9}  {r['tokens']:>9}")
    if tsk:
        if lines:
            lines.append("")
        lines.append(f"{'task':<{width}}  {'acc':>8}  {'acc_norm':>10}  {'n':>9}")
        for name, r in tsk.items():
            lines.append(f"{name:<{width}}  {r['acc']:>8.4f}  {r['acc_norm']:>10.4f}  {r['n']:>9}")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Everything `main` does but printing: validate, build the evaluators, restore, evaluate."""
    from cpt_jax import checkpoint
    from cpt_jax.data.tokenization import load_tokenizer

    ckpt = os.path.abspath(os.path.expanduser(args.checkpoint))
    meta, mc = checkpoint.read_model_config(ckpt, key="--checkpoint", dtype=args.dtype)
    run_cfg = meta.get("config") or {}
    sources = parse_pairs(args.sources, "--sources") if args.sources else checkpoint_sources(meta, log)
    task_files = parse_pairs(args.tasks, "--tasks")
    if not sources and not task_files:
        raise ConfigError("--sources/--tasks: nothing to evaluate, expected --sources name=prepared_dir or --tasks "
                          "name=file.jsonl (the checkpoint's config names no data source found on disk)")
    for key in ("batch_size", "seq_len", "examples_per_source"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"--{key}: {value}, expected a positive integer")
    if args.fewshot < 0:
        raise ConfigError(f"--fewshot: {args.fewshot}, expected an integer >= 0")

    mesh, rules, param_shardings = mesh_for(mc)
    ways = sharding.batch_divisor(mesh, rules)
    batch_size = args.batch_size or _round_up(8, ways)
    if batch_size % ways:
        raise ConfigError(f"--batch_size: {batch_size}, expected a multiple of the {ways} devices the eval batch is "
                          "split over")
    fingerprint = meta.get("tokenizer_fingerprint")
    common = dict(batch_size=batch_size, mesh=mesh, rules=rules)
    source_eval = task_eval = None
    if sources:
        seq_len = args.seq_len or max(int(sources_lib.read_manifest(d)["seq_len"]) for d in sources.values())
        examples = args.examples_per_source or int((run_cfg.get("eval") or {}).get("examples_per_source") or 64)
        source_eval = SourceEvaluator(sources, mc, examples_per_source=examples, seq_len=seq_len,
                                      tokenizer_fingerprint=fingerprint, **common)
    if task_files:
        path = args.tokenizer or checkpoint_tokenizer(ckpt, meta)
        if not path:
            raise ConfigError(f"--tokenizer: the checkpoint {ckpt} names no tokenizer found on disk, expected "
                              "--tokenizer FILE to tokenize --tasks")
        tok = load_tokenizer(path)
        if fingerprint and tok.fingerprint != fingerprint:
            log(f"warning: tokenizer {tok.path} differs from the one the checkpoint records "
                f"({fingerprint[:16]}...); scores may be meaningless")
        specs = {name: {"path": f, "fewshot": args.fewshot, "template": args.template}
                 for name, f in task_files.items()}
        task_eval = TaskEvaluator(specs, tok, mc, seq_len=args.seq_len or mc.max_seq_len,
                                  add_bos=checkpoint_bos(meta, tok, args.bos), **common)

    t0 = time.perf_counter()
    params = restore_params(ckpt, meta, mc, param_shardings)
    n = jax.device_count()
    log(f"restored {ckpt} (step {meta.get('step')}) onto {n} device{'s' if n != 1 else ''} in "
        f"{time.perf_counter() - t0:.1f}s")
    return {
        "sources": source_eval.evaluate(params, log) if source_eval is not None else {},
        "tasks": task_eval.evaluate(params, log, samples=args.log_samples) if task_eval is not None else {},
        "checkpoint": ckpt,
        "step": meta.get("step"),
    }


def _write_json(path: str, obj: Any) -> None:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    primary = jax.process_index() == 0

    def log(message: str) -> None:
        if primary:
            print(message, file=sys.stderr, flush=True)

    try:
        if args.log_samples and not args.out:
            raise ConfigError("--log_samples: no --out, expected --out FILE to write the per-question records to")
        if args.out:
            out = os.path.abspath(os.path.expanduser(args.out))
            if os.path.isdir(out):
                raise ConfigError(f"--out {out}: a directory, expected a file path for the JSON results")
        results = run_cli(args, log)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if primary:
        print(format_table(results))
        if args.out:
            _write_json(args.out, results)
            log(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
