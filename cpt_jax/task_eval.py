"""Multiple-choice accuracy by log-likelihood (task formats in `cpt_jax.tasks`).

Each choice is scored by the summed log-likelihood of its tokens given the prompt. The prompt and
prompt+choice are tokenized separately (as lm-eval-harness does); the tokens of prompt+choice past
the prompt's token count are the choice's. `add_bos` puts BOS first, so that questions begin the
way the training documents did (`checkpoint_model.checkpoint_bos` decides it for the command
line); an empty prompt without BOS is preceded by EOS, the document separator. A sequence longer
than seq_len + 1 tokens loses tokens from the left of its context. `acc` is the fraction of
questions whose highest sum is the gold choice, `acc_norm` the same with each sum divided by the
choice's length in UTF-8 bytes; ties go to the first choice. Every task is read and tokenized once,
at construction (where every input error surfaces), and runs at the next power of two (>= 16,
<= seq_len) above its longest row, compiled once per such length.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cpt_jax import tasks as tasks_lib
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import load_tokenizer
from cpt_jax.model import ModelConfig
from cpt_jax.scoring import RowScorer, bucket_length, round_up


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
    """Multiple-choice accuracy (`acc`, `acc_norm`) of `tasks`, {name: a task file path, a spec for
    `tasks.task_from_spec` or a `tasks.Task`}, tokenized with `tokenizer` (a Tokenizer or its file).
    `seq_len` bounds a scored sequence (prompt + choice), `add_bos` puts BOS before every prompt;
    the other arguments are RowScorer's (a row: one question's choice). ConfigError for a bad task
    file or setting."""

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
