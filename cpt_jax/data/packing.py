"""Tokenize documents into packed fixed-length examples: the on-disk format every source of a run uses.

The documents (cpt_jax.data.documents) are tokenized in worker processes, each preceded by BOS as
`bos` says and followed by EOS, concatenated and cut into examples of seq_len + 1 tokens (inputs
and shifted targets), the trailing partial example dropped. Document boundaries (segment ids)
follow from the EOS positions. The last `val_examples` examples are the validation split, so train
and val never share an example. Output, built in a hidden directory beside DIR and renamed to DIR:
  train-XXXXX-of-YYYYY.array_record   one record per example: the raw little-endian tokens
  val.array_record                    the held-out examples, same record format
  manifest.json                       what `sources.load_source` and the trainer check
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from cpt_jax.config import ConfigError
from cpt_jax.data.documents import BadRecords, read_task, resolve_all, tasks
from cpt_jax.data.tokenization import Tokenizer, describe, load_tokenizer, resolve_bos

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VAL_FILE = "val.array_record"
# One record per chunk so that a random read decodes one example, not a group of them; no
# compression because token ids compress poorly and readers should not pay for decompression.
RECORD_OPTIONS = "group_size:1,uncompressed"
# Held out by default: what an in-loop evaluation reads of each source by default (eval.examples_per_source).
DEFAULT_VAL_EXAMPLES = 64
SHARD_BYTES = 256 << 20
# 'spawn' because the caller may be a process with JAX (and its threads) loaded, where fork is unsafe.
MP_START_METHOD = "spawn"


@dataclasses.dataclass
class _Chunk:
    """What a worker returns for one task."""

    tokens: np.ndarray  # the task's documents, each followed by EOS, in the token dtype
    documents: int
    empty_documents: int
    text_bytes: int
    skipped: int


@functools.cache
def _tokenizer(path: str, fingerprint: str) -> Tokenizer:
    """The tokenizer prepare started with, loaded once per process."""
    tok = load_tokenizer(path)
    if tok.fingerprint != fingerprint:
        raise ConfigError(f"tokenizer {path}: changed while prepare was running (sha256 {tok.fingerprint[:16]}, "
                          f"expected {fingerprint[:16]})")
    return tok


def _process_task(task: tuple, tokenizer_path: str, fingerprint: str, skip_bad_records: bool,
                  add_bos: bool) -> _Chunk:
    """Read one task's documents and tokenize them (runs in a worker process)."""
    bad = BadRecords(skip_bad_records)
    docs, text_bytes = read_task(task, bad)
    # An empty document would only add a lone EOS: count it, do not emit it.
    nonempty = [d for d in docs if d]
    tokens = _tokenizer(tokenizer_path, fingerprint).encode_documents(nonempty, num_threads=1, add_bos=add_bos)
    return _Chunk(tokens, len(nonempty), len(docs) - len(nonempty), text_bytes, bad.count)


def _init_worker() -> None:
    # The `tokenizers` package would start a thread per core in every worker; the workers are the
    # parallelism. Must be set before its thread pool starts (first encode).
    os.environ["RAYON_NUM_THREADS"] = "1"


def _tokenized(tasks: Iterator[tuple], workers: int, context: tuple[str, str, bool, bool]) -> Iterator[_Chunk]:
    """The tasks' chunks in order: made in this process for one worker, else by a process pool with a
    bounded number of tasks in flight (reading stays ahead of the workers without reading everything)."""
    if workers == 1:
        for task in tasks:
            yield _process_task(task, *context)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(MP_START_METHOD),
                               initializer=_init_worker)
    pending: collections.deque[Future] = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_process_task, task, *context))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:  # an error, or the caller closed us: do not wait for the tasks still queued
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def shard_name(index: int, count: int) -> str:
    """File name of train shard `index` of `count`."""
    return f"train-{index:05d}-of-{count:05d}.array_record"


class _ExampleWriter:
    """Writes examples to train shards, holding back the last `val_examples` for the val split: the
    total is unknown until the input ends, so an example goes to train once that many newer ones exist."""

    def __init__(self, directory: str, examples_per_shard: int, val_examples: int):
        self.directory = directory
        self.examples_per_shard = examples_per_shard
        self.val_examples = val_examples
        self.held: collections.deque[np.ndarray] = collections.deque()
        self.writer = None
        self.shard_sizes: list[int] = []

    def add(self, rows: np.ndarray) -> None:
        for row in rows:
            self.held.append(row)
            if len(self.held) > self.val_examples:
                self._write_train(self.held.popleft())

    def _write_train(self, row: np.ndarray) -> None:
        if self.writer is None:
            path = os.path.join(self.directory, f"train-{len(self.shard_sizes):05d}.partial")
            self.writer = ArrayRecordWriter(path, RECORD_OPTIONS)
            self.shard_sizes.append(0)
        self.writer.write(row.tobytes())
        self.shard_sizes[-1] += 1
        if self.shard_sizes[-1] == self.examples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        """Close the train shard being written, if any (all an aborted prepare needs)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def total(self) -> int:
        return sum(self.shard_sizes) + len(self.held)

    def finish(self) -> list[str]:
        """Close the shards, give them their final names, write val. Returns the shard names."""
        self.close_shard()
        names = [shard_name(i, len(self.shard_sizes)) for i in range(len(self.shard_sizes))]
        for i, name in enumerate(names):
            os.rename(os.path.join(self.directory, f"train-{i:05d}.partial"), os.path.join(self.directory, name))
        writer = ArrayRecordWriter(os.path.join(self.directory, VAL_FILE), RECORD_OPTIONS)
        for row in self.held:
            writer.write(row.tobytes())
        writer.close()
        return names


class _Progress:
    """Documents and tokens per second on one stderr line, redrawn at most 5 times a second; only
    when stderr is a terminal (logs of batch jobs get the final summary only)."""

    def __init__(self, name: str):
        self.enabled = sys.stderr.isatty()
        self.name = name
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, documents: int, tokens: int, examples: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        print(f"\rprepare {self.name}: {documents:,} docs ({documents / dt:,.0f}/s), {tokens:,} tokens "
              f"({tokens / dt:,.0f}/s), {examples:,} examples\033[K", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _check_out_dir(out_dir: str) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConfigError(f"--out {out_dir}: exists and is a file, expected a new or empty directory")
        if os.listdir(out_dir):
            raise ConfigError(f"--out {out_dir}: exists and is not empty, expected a new or empty directory "
                              "(prepare never overwrites; delete it or choose another)")


def _positive(flag: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{flag}: {value!r}, expected an integer >= {minimum}")
    return int(value)


def prepare(inputs: list[str], tokenizer_path: str, seq_len: int, out_dir: str,
            val_examples: int = DEFAULT_VAL_EXAMPLES, workers: int = 1, name: str | None = None,
            skip_bad_records: bool = False, tfds_data_dir: str | None = None, *,
            examples_per_shard: int | None = None, bos: str = "auto") -> dict:
    """Tokenize and pack `inputs` into `out_dir`; returns the manifest (also in out_dir/manifest.json).

    The arguments are `python -m cpt_jax.prepare`'s flags, plus `examples_per_shard` (default: shards
    of about 256 MiB). `out_dir` must not exist or be empty; `val_examples` are the last examples,
    fewer than the total; `workers` 1 tokenizes in this process; `bos` 'auto' follows
    `Tokenizer.adds_bos`.

    Raises ConfigError (one line, nothing written) for every user error. With workers > 1 the
    workers are started with 'spawn' (safe in a process that runs JAX), which re-imports the
    caller's main module: call prepare from a script under `if __name__ == "__main__":`.
    A process killed outright (SIGKILL) leaves a hidden `.DIR.incomplete-*` directory beside
    DIR, never a partial DIR.
    """
    start = time.monotonic()
    seq_len = _positive("--seq_len", seq_len, 1)
    val_examples = _positive("--val_examples", val_examples, 0)
    workers = _positive("--workers", workers, 1)
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    _check_out_dir(out_dir)
    name = name or os.path.basename(out_dir)
    tok = load_tokenizer(tokenizer_path)
    add_bos = resolve_bos(bos, tok)
    resolved = resolve_all(inputs, tfds_data_dir)
    length = seq_len + 1
    dtype = tok.dtype.newbyteorder("<")
    if examples_per_shard is None:
        examples_per_shard = max(1, SHARD_BYTES // (length * dtype.itemsize))
    examples_per_shard = _positive("examples_per_shard", examples_per_shard, 1)

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.incomplete-", dir=os.path.dirname(out_dir))
    writer = _ExampleWriter(tmp, examples_per_shard, val_examples)
    progress = _Progress(name)
    documents = empty_documents = text_bytes = skipped = document_tokens = 0
    carry = np.empty(0, dtype)
    try:
        context = (tok.path, tok.fingerprint, skip_bad_records, add_bos)
        with contextlib.closing(_tokenized(tasks(resolved), workers, context)) as chunks:
            for chunk in chunks:
                documents += chunk.documents
                empty_documents += chunk.empty_documents
                text_bytes += chunk.text_bytes
                skipped += chunk.skipped
                document_tokens += chunk.tokens.size
                buf = np.concatenate([carry, chunk.tokens]) if carry.size else chunk.tokens
                full = buf.size // length
                writer.add(buf[: full * length].reshape(full, length))
                carry = buf[full * length:].copy()
                progress.update(documents, document_tokens, writer.total)
        progress.close()
        total = writer.total
        if total == 0:
            raise ConfigError(f"{name}: the inputs give {document_tokens} tokens ({documents} documents), fewer "
                              f"than one example of seq_len + 1 = {length} tokens; expected a non-empty source "
                              "(more data or a smaller --seq_len)")
        if val_examples >= total:
            raise ConfigError(f"--val_examples: {val_examples}, expected fewer than the {total} examples the "
                              "inputs give (train would be empty)")
        shards = writer.finish()
        train = total - val_examples
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "inputs": list(inputs),
            **describe(tok),
            "bos": bos,
            "add_bos": add_bos,  # whether every document starts with BOS (what the trainer checks)
            "seq_len": seq_len,
            "example_length": length,
            "dtype": tok.dtype.name,
            "byte_order": "little",
            "examples": train,
            "val_examples": val_examples,
            "tokens": train * length,
            "val_tokens": val_examples * length,
            "documents": documents,
            "empty_documents": empty_documents,
            "document_tokens": document_tokens,
            "dropped_tokens": int(carry.size),
            "text_bytes": text_bytes,
            "bytes_per_token": text_bytes / document_tokens,
            "shards": shards,
            "shard_examples": list(writer.shard_sizes),
            "val_file": VAL_FILE,
            "skipped_records": skipped,
            "record_options": RECORD_OPTIONS,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _publish(tmp, out_dir)
    except BaseException:
        progress.close()
        writer.close_shard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - start
    print(f"prepared {name}: {documents:,} documents, {document_tokens:,} tokens -> {train:,} train + "
          f"{val_examples:,} val examples of {length} tokens ({tok.dtype.name}) in {len(shards)} shard(s), "
          f"{skipped:,} skipped records; {seconds:.1f} s, {documents / seconds:,.0f} docs/s, "
          f"{document_tokens / seconds:,.0f} tokens/s -> {out_dir}", file=sys.stderr)
    return manifest


def _publish(tmp: str, out_dir: str) -> None:
    """Give the finished temporary directory its final name (an atomic rename)."""
    # mkdtemp makes the directory private (0700); the output should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if os.path.isdir(out_dir):
        _check_out_dir(out_dir)  # someone may have written into it while prepare ran
        os.rmdir(out_dir)
    os.rename(tmp, out_dir)
