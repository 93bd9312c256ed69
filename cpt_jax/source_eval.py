"""Validation loss, perplexity and bits per byte of prepared sources.

The first `examples_per_source` examples of each source's `val` split, the same at every
evaluation so that curves are comparable, attention masked per document as in training (segment
ids from EOS): the eval loss of a training source is the training loss on held-out data.
bits_per_byte is (summed NLL / ln 2) / (tokens * the manifest's `bytes_per_token`): an estimate
from the source's average, not the exact bytes of the evaluated examples, that makes models with
different tokenizers comparable (None without bytes_per_token). Every source is read once, into
numpy rows, at construction (where every input error surfaces); all sources share one compiled
program, the last batch padded with rows whose loss mask is 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cpt_jax.config import ConfigError
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.model import ModelConfig
from cpt_jax.scoring import RowScorer, positive, round_up


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
    with a val split (see the module docstring). A source prepared with a shorter seq_len than the
    eval's is padded (masked), a longer one is an error; with `tokenizer_fingerprint`, one prepared
    with another tokenizer is refused. The other arguments are RowScorer's. ConfigError for a
    missing or incompatible source or a bad setting."""

    def __init__(self, sources: Mapping[str, str], model_config: ModelConfig, *, examples_per_source: int,
                 batch_size: int, seq_len: int, mesh: Any = None, rules: Any = None, chunk_tokens: int = 0,
                 tokenizer_fingerprint: str | None = None):
        self.examples_per_source = positive("eval.examples_per_source", examples_per_source)
        self.scorer = RowScorer(model_config, batch_size=batch_size, seq_len=seq_len, mesh=mesh, rules=rules,
                                chunk_tokens=chunk_tokens)
        self.model_config = model_config
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
