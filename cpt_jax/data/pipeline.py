"""The data loader: step -> this process's rows of the step's batch -> global `jax.Array`s.

Step `s` consumes global examples [s*B, (s+1)*B) (B = train.batch_size). Which example a global
index is comes from the mixture (source, k-th draw of that source) and `sources.record_indices`
(k -> a record, reshuffled every epoch of the source): a pure function of (config, seed, index).
Each process reads only the rows of the batch its devices hold, so the same run on 1 host or 16,
on 8 devices or 4, sees the same examples in the same steps, and resuming at step k needs nothing
but k (Principles 1 and 2).

Reading is vectorised: one `record_indices` call per source and one read call per (source, shard)
per batch; the raw token bytes of the whole batch decoded by one `np.frombuffer`; segment ids and
positions computed for the whole batch at once from the EOS positions. `iterate` builds upcoming
batches on `data.num_threads` reading threads and keeps `data.prefetch` of them ready for the
device, from a background thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.config import ConfigError
from cpt_jax.data import mixture as mixture_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data.synthetic import synthetic_examples

# The batch contract with the trainer: every field is [rows, train.seq_len].
BATCH_DTYPES: dict[str, Any] = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}
BATCH_KEYS = tuple(BATCH_DTYPES)
SYNTHETIC = "synthetic"
# Random reads: no readahead (it would read records nobody asked for), and each read call served in
# the calling thread (the reader's own parallel dispatch costs more than it saves for the few
# records a batch takes from one shard; reads of different shards run on the pipeline's threads).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> slice:
    """The rows of a [global_batch, ...] array that this process's devices hold, as one slice.

    The rows must form one contiguous range (devices replicated over other axes may repeat rows);
    anything else cannot be fed by `make_array_from_process_local_data` from one local block.
    """
    # Only rows matter; the device count as the length divides any sharding of that dimension too.
    length = max(1, len(sharding.device_set))
    index_map = sharding.addressable_devices_indices_map((global_batch, length))
    spans = set()
    for index in index_map.values():
        rows = index[0] if index else slice(None)
        start, stop, step = rows.indices(global_batch)
        if step != 1:
            raise ValueError(f"batch sharding gives a device rows {rows}, expected a contiguous block")
        spans.add((start, stop))
    ordered = sorted(spans)
    lo, hi = ordered[0]
    for start, stop in ordered[1:]:
        if start > hi:
            raise ConfigError(
                f"mesh: this process (index {jax.process_index()}) holds rows {ordered} of the global batch of "
                f"{global_batch}, expected one contiguous range; order the mesh so that each process's devices "
                "are adjacent along the batch axes"
            )
        hi = max(hi, stop)
    return slice(lo, hi)


def _batch_shards(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, str]:
    """(how many ways the batch dimension is split, a description) without requiring divisibility."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = sharding.spec
        axes = spec[0] if len(spec) else None
        if axes is None:
            return 1, "no mesh axis"
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        size = 1
        for a in axes:
            size *= sharding.mesh.shape[a]
        return size, f"mesh axes {axes}"
    # Any other sharding: ask it for the shard shape of a batch that always divides.
    n = len(sharding.device_set)
    shard_rows = sharding.shard_shape((n * global_batch, n))[0]
    return (n * global_batch) // shard_rows, "the batch sharding"


class RecordReader:
    """Batched random reads of a prepared source's train records, decoded to int32 tokens.

    Reads the shards the manifest lists with one ArrayRecord reader per shard (opened lazily,
    shared by the reading threads) and one batched `read` per shard and request: several times
    faster than decoding record by record through the grain dataset, which matters because the
    loader must keep up with the device on hosts with few cores.
    """

    def __init__(self, source: Any):
        from array_record.python import array_record_module

        self._module = array_record_module
        self.name = source.name
        self.length = int(source.manifest["seq_len"]) + 1
        # Records are the raw little-endian tokens (prepare's format).
        self.dtype = np.dtype(source.manifest["dtype"]).newbyteorder("<")
        self.paths = [os.path.join(source.directory, f) for f in source.manifest["shards"]]
        self._readers: list[Any] = [None] * len(self.paths)
        self._lock = threading.Lock()
        sizes = [self._reader(i).num_records() for i in range(len(self.paths))]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.starts[-1] != source.num_examples:
            raise ConfigError(
                f"{source.directory}: {self.starts[-1]} records in the train shards, expected "
                f"{source.num_examples} (from its manifest); prepare it again"
            )

    def _reader(self, shard: int) -> Any:
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                reader = self._readers[shard]
                if reader is None:
                    # No readahead: reads are random, a readahead buffer would be wasted.
                    reader = self._module.ArrayRecordReader(self.paths[shard], READER_OPTIONS)
                    self._readers[shard] = reader
        return reader

    def by_shard(self, records: np.ndarray) -> list[tuple[np.ndarray, int, list[int]]]:
        """(positions in `records`, shard, record positions within the shard) for every shard used."""
        records = np.asarray(records, dtype=np.int64)
        shard = np.searchsorted(self.starts, records, side="right") - 1
        groups = []
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            groups.append((rows, int(s), (records[rows] - self.starts[s]).tolist()))
        return groups

    def read_shard(self, shard: int, positions: list[int]) -> list[bytes]:
        """Raw records (little-endian tokens) at these positions of one shard: one read call."""
        raw = self._reader(shard).read(positions)
        size = self.length * self.dtype.itemsize
        for record in raw:
            if len(record) != size:
                raise ValueError(f"{self.paths[shard]}: a record of {len(record)} bytes, expected {size}")
        return raw

    def read_bytes(self, records: np.ndarray) -> list[bytes]:
        """The raw records of the given record indices, in that order."""
        out: list[bytes] = [b""] * len(records)
        for rows, shard, positions in self.by_shard(records):
            for row, record in zip(rows.tolist(), self.read_shard(shard, positions), strict=True):
                out[row] = record
        return out

    def read(self, records: np.ndarray) -> np.ndarray:
        """int32 [len(records), seq_len + 1] tokens of the given record indices (any order)."""
        data = b"".join(self.read_bytes(records))
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, self.length).astype(np.int32)

    def close(self) -> None:
        """Closes the open shard readers."""
        with self._lock:
            for i, reader in enumerate(self._readers):
                if reader is not None:
                    reader.close()
                    self._readers[i] = None


class Pipeline:
    """Batches of a run, a pure function of (config, seed, step). See the module docstring.

    Args:
      cfg: the whole config (train.*, data.*, model.vocab_size, seed).
      schedule: the run's `schedules.Schedule` (mixture phases resolve through it).
      batch_sharding: sharding of [batch, length] arrays; None: this process holds the whole
        batch and `global_batch` returns single-device arrays (tests, plan).
    """

    def __init__(self, cfg: Any, schedule: Any, batch_sharding: jax.sharding.Sharding | None = None):
        self.cfg = cfg
        self.schedule = schedule
        self.batch_sharding = batch_sharding
        self.batch_size = int(cfg.train.batch_size)
        self.seq_len = int(cfg.train.seq_len)
        self.seed = int(cfg.seed)
        self.prefetch = int(cfg.data.prefetch)
        self.num_threads = int(cfg.data.num_threads)
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch: {cfg.data.prefetch!r}, expected at least 1 batch")
        if self.num_threads < 1:
            raise ConfigError(f"data.num_threads: {cfg.data.num_threads!r}, expected at least 1 thread")
        self.rows = self._check_topology()
        self.kind = cfg.data.kind
        if self.kind == SYNTHETIC:
            self.tokenizer_fingerprint: str | None = None
            self.eos_id: int | None = None
            self.sources: list[Any] = []
            self.readers: list[RecordReader] = []
            self.source_names = [SYNTHETIC]
            self.phases = [mixture_lib.Phase(index=0, start_step=0, weights={SYNTHETIC: 1.0}, start_at=None)]
        elif self.kind == "mixture":
            self._load_mixture(cfg)
        else:
            raise ConfigError(f"data.kind: {self.kind!r}, expected one of 'synthetic', 'mixture'")
        self.mixture = mixture_lib.Mixture(self.phases, self.source_names, self.batch_size)
        # Reused by every batch: positions are arange minus segment starts, the mask is all ones.
        rows = self.rows.stop - self.rows.start
        self._arange = np.arange(max(rows, 1) * self.seq_len, dtype=np.int32)
        self._ones = np.ones(self.seq_len, np.float32)

    # ------------------------------------------------------------------------- setup

    def _check_topology(self) -> slice:
        B = self.batch_size
        processes = jax.process_count()
        if B % processes:
            raise ConfigError(
                f"train.batch_size: {B}, expected a multiple of the {processes} processes "
                "(each process reads an equal slice of every batch)"
            )
        if self.batch_sharding is None:
            return slice(0, B)
        shards, where = _batch_shards(self.batch_sharding, B)
        if B % shards:
            raise ConfigError(
                f"train.batch_size: {B}, expected a multiple of the {shards} devices the batch is split over "
                f"({where})"
            )
        return process_rows(self.batch_sharding, B)

    def _load_mixture(self, cfg: Any) -> None:
        from cpt_jax.data.tokenizer import load_tokenizer

        if not cfg.data.tokenizer:
            raise ConfigError(
                "data.tokenizer: empty, expected the tokenizer file the sources were prepared with "
                "(when data.kind is 'mixture')"
            )
        if not len(cfg.data.sources):
            raise ConfigError("data.sources: empty, expected {name: prepared directory} when data.kind is 'mixture'")
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.tokenizer_fingerprint = tokenizer.fingerprint
        self.eos_id = int(tokenizer.eos_id)
        self.source_names = list(cfg.data.sources.keys())
        self.sources = []
        for name in self.source_names:
            source = sources_lib.load_source(cfg.data.sources[name])
            source.check_compatible(
                tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=cfg.model.vocab_size, seq_len=self.seq_len
            )
            self.sources.append(source)
        self.readers = [RecordReader(source) for source in self.sources]
        # Every shard of every source in one table: a batch is grouped by shard with one sort.
        self._shards = [(reader, i) for reader in self.readers for i in range(len(reader.paths))]
        sizes = np.array([int(reader.starts[-1]) for reader in self.readers], dtype=np.int64)
        self._source_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._shard_starts = np.concatenate(
            [base + reader.starts[:-1] for base, reader in zip(self._source_base, self.readers, strict=True)]
        )
        self.phases = mixture_lib.resolve_phases(
            cfg.data.phases, self.source_names, self.schedule, self.batch_size, self.seq_len
        )

    # ------------------------------------------------------------------------- order

    def phase_at(self, step: int) -> int:
        """Index of the mixture phase that step `step` trains in."""
        return self.mixture.phase_at(step)

    def tokens_per_source(self, step: int) -> dict[str, int]:
        """Tokens each source has served to the model in steps [0, step) (train.seq_len per example)."""
        return self.mixture.tokens_per_source(step, self.seq_len)

    def _records(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source, k = self.mixture.select(indices)
        if self.kind == SYNTHETIC:
            return source, indices.astype(np.int64)
        records = np.empty_like(k)
        for s in np.unique(source):
            mask = source == s
            name = self.source_names[s]
            records[mask] = sources_lib.record_indices(self.seed, name, self.sources[s].num_examples, k[mask])
        return source, records

    def examples_for_step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, record index) of each of the step's B global examples, in batch order."""
        start = int(step) * self.batch_size
        return self._records(np.arange(start, start + self.batch_size, dtype=np.int64))

    # ------------------------------------------------------------------------- batches

    def _read_rows(self, source: np.ndarray, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (source id, record index) examples as int32 tokens [rows, seq_len + 1], and the flat
        indices of their EOS tokens.

        The rows are grouped by shard with one sort over a table of every shard of every source,
        then read with one call per shard; the raw bytes of all the rows are joined, viewed by one
        `np.frombuffer`, searched for EOS in their stored width (half the memory of int32) and
        cast to int32 in one pass.
        """
        n = len(records)
        ids = self._source_base[source] + records  # a record id unique across the sources
        shard = np.searchsorted(self._shard_starts, ids, side="right") - 1
        order = np.argsort(shard, kind="stable")
        shard = shard[order]
        positions = (ids[order] - self._shard_starts[shard]).tolist()
        rows = order.tolist()
        bounds = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), n]
        raw: list[bytes] = [b""] * n
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            reader, index = self._shards[shard[lo]]
            for row, record in zip(rows[lo:hi], reader.read_shard(index, positions[lo:hi]), strict=True):
                raw[row] = record
        stored = np.frombuffer(b"".join(raw), dtype=self.readers[0].dtype)
        eos = np.flatnonzero(stored == self.eos_id)
        return stored.astype(np.int32).reshape(n, self.seq_len + 1), eos

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`'s batch as numpy arrays (see BATCH_DTYPES).

        `inputs` and `targets` are views of one [rows, seq_len + 1] token array and `loss_mask` is
        a read-only broadcast of ones: no copies that the transfer to the device makes anyway.
        Thread-safe: `iterate` builds several steps at once on its reading threads.
        """
        start = int(step) * self.batch_size
        indices = np.arange(start + self.rows.start, start + self.rows.stop, dtype=np.int64)
        source, records = self._records(indices)
        n, L = len(indices), self.seq_len
        if self.kind == SYNTHETIC:
            tokens = synthetic_examples(
                self.seed, records, L, int(self.cfg.model.vocab_size), int(self.cfg.data.synthetic_branching)
            )
            segment_ids = np.ones((n, L), np.int32)
            positions = np.broadcast_to(self._arange[:L], (n, L)).copy()
        else:
            # One batch is read by one thread with as few read calls as possible: the ArrayRecord
            # reader already spreads a call over its own threads, so splitting a batch among ours
            # (more, smaller calls) measured slower on a 2-core host, not faster.
            tokens, eos = self._read_rows(source, records)
            row, col = np.divmod(eos, L + 1)
            segment_ids, positions = _spread_segments(row, col, n, L, self._arange, None)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segment_ids,
            "positions": positions,
            "loss_mask": np.broadcast_to(self._ones, (n, L)),
        }

    def _to_global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.batch_sharding is None:
            return jax.device_put(host)
        shape = (self.batch_size, self.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, shape) for k, v in host.items()}

    def global_batch(self, step: int) -> dict[str, jax.Array]:
        """Step `step`'s batch as global arrays with the batch sharding."""
        return self._to_global(self.host_batch(step))

    def iterate(self, start_step: int, end_step: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """(step, global batch) for steps [start_step, end_step), prepared ahead in the background.

        `data.num_threads` reading threads build the host batches of the next steps; a prefetch
        thread hands them to the devices in step order and keeps up to `data.prefetch` of them
        ready. An error there is raised here, in the consumer. Stopping early (break, `close()`,
        dropping the iterator) stops and joins all those threads.
        """
        return _Prefetcher(self, int(start_step), int(end_step))

    def close(self) -> None:
        """Closes the shard readers (a later read opens them again)."""
        for reader in self.readers:
            reader.close()


def document_segments(
    inputs: np.ndarray,
    eos_id: int,
    arange: np.ndarray | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (from 1) and in-document positions of input tokens [rows, L]: int32 arrays.

    The same result as `sources.segment_ids_and_positions` (a segment starts at position 0 and
    right after every EOS) with fewer full-size passes: one comparison finds the EOS tokens, and
    both outputs are spread from the (few) segment starts by `np.repeat`. `arange` may pass a
    cached np.arange(>= rows * L, dtype=int32); `out` = (segment_ids, positions), C-contiguous
    int32 [rows, L], to fill in place.
    """
    rows, length = inputs.shape
    row, col = np.divmod(np.flatnonzero(inputs == eos_id), length)
    return _spread_segments(row, col, rows, length, arange, out)


def example_segments(
    examples: np.ndarray,
    eos_id: int,
    arange: np.ndarray | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`document_segments` of the inputs examples[:, :-1] of [rows, L + 1] examples, searching the
    examples as one block (contiguous memory compares several times faster than the strided view)."""
    rows, width = examples.shape
    row, col = np.divmod(np.flatnonzero(examples == eos_id), width)
    return _spread_segments(row, col, rows, width - 1, arange, out)


def _spread_segments(
    row: np.ndarray,
    col: np.ndarray,
    rows: int,
    length: int,
    arange: np.ndarray | None,
    out: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions [rows, length] from the (row, column) of every EOS token."""
    n = rows * length
    if out is not None and not (out[0].flags.c_contiguous and out[1].flags.c_contiguous):
        raise ValueError("document_segments: out arrays must be C-contiguous (filled through flat views)")
    # The token after an EOS starts a segment, unless the EOS is the row's last input (or a target).
    keep = col < length - 1
    starts = np.concatenate([np.arange(0, n, length), row[keep] * length + col[keep] + 1])
    starts.sort()
    lengths = np.diff(starts, append=n)
    # Segment number within its row: count since the row's first segment (at a multiple of length).
    row_first = np.flatnonzero(starts % length == 0)
    local = np.arange(1, len(starts) + 1) - np.repeat(row_first, np.diff(row_first, append=len(starts)))
    segment_ids = np.repeat(local.astype(np.int32), lengths)
    segment_start = np.repeat(starts.astype(np.int32), lengths)
    if arange is None or len(arange) < n:
        arange = np.arange(n, dtype=np.int32)
    if out is None:
        # The repeated starts become the positions in place: no further full-size arrays.
        np.subtract(arange[:n], segment_start, out=segment_start)
        return segment_ids.reshape(rows, length), segment_start.reshape(rows, length)
    out[0].reshape(n)[:] = segment_ids
    np.subtract(arange[:n], segment_start, out=out[1].reshape(n))
    return out


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    # Bounded waits so that a consumer that went away (close) is noticed.
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(pipeline: Pipeline, start: int, end: int, q: queue.Queue, stop: threading.Event) -> None:
    """Body of the prefetch thread: `data.num_threads` reading threads build the host batches of
    the next steps, this thread hands them to the devices in step order. It must not reference
    the _Prefetcher: then dropping the iterator frees it, and its __del__ stops this thread."""
    try:
        with concurrent.futures.ThreadPoolExecutor(pipeline.num_threads, thread_name_prefix="cpt_jax-read") as pool:
            pending: collections.deque = collections.deque()
            step = start
            try:
                while pending or step < end:
                    while step < end and len(pending) < pipeline.num_threads:
                        pending.append((step, pool.submit(pipeline.host_batch, step)))
                        step += 1
                    done, future = pending.popleft()
                    host = future.result()
                    if stop.is_set() or not _put(q, stop, (done, pipeline._to_global(host))):
                        return
            finally:
                for _, future in pending:
                    future.cancel()
        _put(q, stop, _END)
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
        _put(q, stop, _Failure(e))


class _Prefetcher:
    """Iterator over (step, batch) filled by a background thread through a bounded queue."""

    def __init__(self, pipeline: Pipeline, start: int, end: int):
        self._queue: queue.Queue = queue.Queue(maxsize=pipeline.prefetch)
        self._stop = threading.Event()
        self._done = False
        self.thread = threading.Thread(
            target=_produce,
            args=(pipeline, start, end, self._queue, self._stop),
            name="cpt_jax-prefetch",
            daemon=True,
        )
        self.thread.start()

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> tuple[int, dict[str, jax.Array]]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the background thread and waits for it (idempotent)."""
        self._done = True
        self._stop.set()
        # Garbage collection may run __del__ on any thread, the prefetch thread included.
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def __enter__(self) -> _Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A consumer that breaks out of a for loop drops the iterator: stop the thread then.
        if not getattr(self, "_done", True):
            self.close()
