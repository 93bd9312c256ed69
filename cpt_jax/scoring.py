"""Log-likelihood scoring of held-out text: validation loss, perplexity and bits per byte of
prepared sources (`SourceEvaluator`) and multiple-choice accuracy (`TaskEvaluator`; task formats in
`cpt_jax.tasks`), both from `RowScorer`, the summed negative log-likelihood of each row of
fixed-shape batches, placed on the devices as `Placement` says (as decoding places its arrays).
Row sums are added in float64 on the host, so a result does not depend on the mesh or the batch
size (beyond float32 rounding of each row). Every source and task is read, and tokenized, once at
construction, where every input error surfaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cpt_jax import losses, model, sharding
from cpt_jax import tasks as tasks_lib
from cpt_jax.config import ConfigError
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data.tokenization import load_tokenizer
from cpt_jax.model import ModelConfig


class Placement:
    """The mesh the parameters live on (None: the default device) and the rules they were placed
    with (a dict or the model's tuple of pairs; None: the training defaults)."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None, rules: Any = None):
        self.mesh = mesh
        self.rules = dict(rules or sharding.DEFAULT_RULES) if mesh is not None else {}
        self.rules_tuple = sharding.rules_tuple(self.rules)  # hashable: what the model takes
        self.ways = sharding.batch_divisor(mesh, self.rules) if mesh is not None else 1
        # Every process reads what the programs return, so their outputs come back replicated.
        self.replicated = sharding.replicated(mesh) if mesh is not None else None

    def context(self):
        """The mesh as the ambient mesh of the code inside (nothing without a mesh)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def put(self, x: np.ndarray, names: Sequence[str | None] = ("batch", "length")) -> jax.Array:
        """A host array (the same on every process) on the devices, its dimensions sharded as the
        logical axes `names` say."""
        if self.mesh is None:
            return jax.device_put(x)
        where = jax.sharding.NamedSharding(self.mesh, sharding.spec_for(names, self.rules))
        return jax.make_array_from_callback(x.shape, where, lambda idx: x[idx])


def positive(key: str, value: Any) -> int:
    """`value` as an int; ConfigError naming `key` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{key}: {value!r}, expected a positive integer")
    return int(value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(longest: int) -> int:
    """The power of two (at least 16) that rows of up to `longest` tokens are padded to, so that
    similar lengths share one compiled program."""
    return max(16, 1 << max(0, longest - 1).bit_length())


class RowScorer:
    """Scores rows of at most `seq_len` tokens in batches of `batch_size` rows (a multiple of the
    devices the batch is split over as training splits it), the parameters placed by `mesh` and
    `rules` (see Placement), with one jitted program per row length shared by every scorer of the
    model. `chunk_tokens`: train.loss_chunk_tokens (0: the whole sequence). ConfigError for a bad
    setting."""

    def __init__(self, model_config: ModelConfig, *, batch_size: int, seq_len: int, mesh: Any = None,
                 rules: Any = None, chunk_tokens: int = 0):
        self.batch_size = positive("eval.batch_size", batch_size)
        self.seq_len = positive("eval seq_len", seq_len)
        if self.seq_len > model_config.max_seq_len:
            raise ConfigError(f"eval seq_len: {seq_len}, expected at most model.max_seq_len {model_config.max_seq_len}")
        self.model_config = model_config
        self.placement = Placement(mesh, rules)
        ways = self.placement.ways
        if self.batch_size % ways:
            key = "eval.batch_size"
            raise ConfigError(f"{key}: {batch_size}, expected a multiple of the {ways} devices the eval batch "
                              "is split over")
        self.chunk_tokens = int(chunk_tokens or 0)

    def step(self, length: int) -> Callable:
        """The jitted (params, batch) -> summed NLL of each row [B] for rows of `length` tokens."""
        chunk = self.chunk_tokens if 0 < self.chunk_tokens < length and length % self.chunk_tokens == 0 else 0
        return _row_nll_step(self.model_config, self.placement.rules_tuple, chunk, self.placement.replicated)

    def row_nll(self, params: Any, rows: int, length: int, batch: Callable[[int, int], dict]) -> np.ndarray:
        """Summed NLL (float64) of `rows` rows (a multiple of the batch size) of `length` tokens;
        batch(lo, hi) gives the host arrays of rows [lo, hi)."""
        step = self.step(length)
        outs = []
        with self.placement.context():
            for lo in range(0, rows, self.batch_size):  # every batch is dispatched before any result is read
                arrays = batch(lo, lo + self.batch_size)
                outs.append(step(params, {k: self.placement.put(v) for k, v in arrays.items()}))
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


def source_metrics(nll_sum: float, tokens: int, bytes_per_token: float | None) -> dict[str, Any]:
    """{loss, perplexity, bits_per_byte, tokens} from a summed NLL (nats) over `tokens` tokens."""
    loss = float(nll_sum) / tokens
    perplexity = math.inf if loss >= 700 else math.exp(loss)  # NaN stays NaN
    bpb = float(nll_sum) / math.log(2.0) / (tokens * bytes_per_token) if bytes_per_token else None
    return {"loss": loss, "perplexity": perplexity, "bits_per_byte": bpb, "tokens": int(tokens)}


@dataclasses.dataclass
class _SourceSet:
    examples: int
    tokens: int
    bytes_per_token: float | None
    arrays: dict[str, np.ndarray]


class SourceEvaluator:
    """Validation loss, perplexity and bits per byte of prepared sources, {name: directory} each
    with a val split: the first `examples_per_source` examples of each, the same at every evaluation
    so that curves are comparable, attention masked per document as in training (segment ids from
    EOS), so the eval loss of a training source is the training loss on held-out data.
    bits_per_byte is (summed NLL / ln 2) / (tokens * the manifest's `bytes_per_token`): an estimate
    from the source's average, not the exact bytes of the evaluated examples, that makes models with
    different tokenizers comparable (None without bytes_per_token). All sources share one compiled
    program, the last batch padded with rows whose loss mask is 0; a source prepared with a shorter
    seq_len than the eval's is padded (masked), a longer one is an error; with
    `tokenizer_fingerprint`, one prepared with another tokenizer is refused. The other arguments
    are RowScorer's. ConfigError for a missing or incompatible source or a bad setting."""

    def __init__(self, sources: Mapping[str, str], model_config: ModelConfig, *, examples_per_source: int,
                 batch_size: int, seq_len: int, mesh: Any = None, rules: Any = None, chunk_tokens: int = 0,
                 tokenizer_fingerprint: str | None = None):
        self.examples_per_source = positive("eval.examples_per_source", examples_per_source)
        self.scorer = RowScorer(model_config, batch_size=batch_size, seq_len=seq_len, mesh=mesh, rules=rules,
                                chunk_tokens=chunk_tokens)
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
        vocab_size = self.scorer.model_config.vocab_size
        if m["vocab_size"] > vocab_size:
            raise ConfigError(f"{path}: vocab_size {m['vocab_size']}, expected at most the model's vocab_size "
                              f"{vocab_size}")
        length, seq_len = src.seq_len, self.scorer.seq_len
        if length > seq_len:
            raise ConfigError(f"{path}: seq_len {length}, expected at most the eval seq_len {seq_len} "
                              "(prepare the source with a shorter --seq_len, or evaluate with a longer one)")
        n = min(self.examples_per_source, src.num_examples)
        # The first n val examples through grain with the trainer's batch fields (segments from EOS).
        fields = src.dataset[:n].batch(n).map(pipeline_lib.BatchFields(int(m["eos_id"])))[0]
        # Padding rows: token 0, segment 0, loss mask 0.
        rows = round_up(n, self.scorer.batch_size)
        arrays = {k: np.zeros((rows, seq_len), dt) for k, dt in pipeline_lib.BATCH_DTYPES.items()}
        arrays["positions"][:] = np.arange(seq_len, dtype=np.int32)
        for key, value in fields.items():
            arrays[key][:n, :length] = value
        bpt = m.get("bytes_per_token")
        bpt = float(bpt) if isinstance(bpt, (int, float)) and not isinstance(bpt, bool) and bpt > 0 else None
        return _SourceSet(n, n * length, bpt, arrays)

    def evaluate(self, params: Any, log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
        """{name: {loss, perplexity, bits_per_byte, tokens}} of every source for these parameters."""
        results = {}
        for name, s in self.sets.items():
            t0 = time.perf_counter()
            rows, length = s.arrays["inputs"].shape
            batch = lambda lo, hi, a=s.arrays: {k: v[lo:hi] for k, v in a.items()}
            nll = float(self.scorer.row_nll(params, rows, length, batch).sum())
            r = results[name] = source_metrics(nll, s.tokens, s.bytes_per_token)
            if log is not None:
                bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
                log(f"eval source {name}: loss {r['loss']:.4f} perplexity {r['perplexity']:.3f} bits/byte {bpb} "
                    f"({s.examples} examples, {s.tokens} tokens, {time.perf_counter() - t0:.1f}s)")
        return results


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

    def accuracy(predictions):
        return sum(p == g for p, g in zip(predictions, golds, strict=True)) / len(golds) if golds else 0.0

    return accuracy(choice_predictions(logliks)), accuracy(choice_predictions(logliks, choice_bytes))


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
    """Multiple-choice accuracy of `tasks`, {name: a task file path, a spec for
    `tasks.task_from_spec` or a `tasks.Task`}, tokenized with `tokenizer` (a Tokenizer or its file).

    Each choice is scored by the summed log-likelihood of its tokens given the prompt. The prompt
    and prompt+choice are tokenized separately (as lm-eval-harness does); the tokens of
    prompt+choice past the prompt's token count are the choice's. `add_bos` puts BOS first, so that
    questions begin the way the training documents did (`checkpoint_model.checkpoint_bos` decides
    it for the command line); an empty prompt without BOS is preceded by EOS, the document
    separator. A sequence longer than `seq_len` + 1 tokens loses tokens from the left of its
    context. `acc` is the fraction of questions whose highest sum is the gold choice, `acc_norm` the
    same with each sum divided by the choice's length in UTF-8 bytes; ties go to the first choice.
    A task runs at the next power of two (>= 16, <= seq_len) above its longest row, compiled once
    per such length. The other arguments are RowScorer's (a row: one question's choice).
    ConfigError for a bad task file or setting."""

    def __init__(self, tasks: Mapping[str, Any], tokenizer: Any, model_config: ModelConfig, *, seq_len: int,
                 batch_size: int, mesh: Any = None, rules: Any = None, chunk_tokens: int = 0, add_bos: bool = False):
        self.scorer = RowScorer(model_config, batch_size=batch_size, seq_len=seq_len, mesh=mesh, rules=rules,
                                chunk_tokens=chunk_tokens)
        self.tokenizer = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path}: {self.tokenizer.vocab_size} tokens, expected at most "
                              f"the model's vocab_size {model_config.vocab_size}")
        if add_bos and self.tokenizer.bos_id is None:
            raise ConfigError(f"add_bos: tokenizer {self.tokenizer.path} has no BOS token, expected one")
        self.add_bos = bool(add_bos)
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
        limit = self.scorer.seq_len + 1
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
        length, chunk = bucket_length(max(len(s) - 1 for s in seqs)), self.scorer.chunk_tokens
        if chunk and length > chunk:  # a multiple of the loss chunk, so that the loss is chunked
            length = round_up(length, chunk)
        length = min(length, self.scorer.seq_len)
        padded = round_up(len(seqs), self.scorer.batch_size)
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
        ll = -self.scorer.row_nll(params, len(s.tokens), s.length, s.batch)[: s.rows]
        return [ll[s.offsets[q]:s.offsets[q + 1]] for q in range(len(s.golds))]

    def evaluate(self, params: Any, log: Callable[[str], None] | None = None,
                 samples: bool = False) -> dict[str, dict[str, Any]]:
        """{name: {acc, acc_norm, n}} of every task for these parameters; with `samples`, also
        `samples`: per question (in file order) its line in the task file, the choices' summed
        log-likelihoods, the predicted choice (acc's), the gold and whether they agree."""
        results = {}
        for name, s in self.sets.items():
            t0 = time.perf_counter()
            logliks = self.loglikelihoods(params, name)
            acc, acc_norm = choice_metrics(logliks, s.choice_bytes, s.golds)
            results[name] = {"acc": acc, "acc_norm": acc_norm, "n": len(s.golds)}
            if samples:
                results[name]["samples"] = [
                    {"line": ex.line, "loglikelihoods": [float(x) for x in ll], "pred": pred, "gold": ex.gold,
                     "correct": pred == ex.gold}
                    for ex, ll, pred in zip(s.task.examples, logliks, choice_predictions(logliks), strict=True)]
            if log is not None:
                cut = f", {s.truncated} truncated" if s.truncated else ""
                log(f"eval task {name}: acc {acc:.4f} acc_norm {acc_norm:.4f} ({len(s.golds)} questions, "
                    f"{s.rows} choices at length {s.length}{cut}, {time.perf_counter() - t0:.1f}s)")
        return results
