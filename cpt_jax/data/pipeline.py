"""The data loader, a grain pipeline: step -> this process's rows of the step's batch -> global `jax.Array`s.

Step `s` consumes global examples [s*B, (s+1)*B); which example a global index is comes from the
mixture (source, k-th draw) and the source's per-epoch order. Built from grain's parts:

    each source   MapDataset.source(ArrayRecordDataSource) -> decode -> EpochShuffle -> repeat
                  (synthetic data: MapDataset.range, the draw is the example's global index)
    mixture       MapDataset.select_from_datasets(sources, ProcessSelection(mixture, rows, steps)):
                  local index i is row rows.start + i % R of step i // R (R = this process's rows)
    batch         .batch(R) -> .map(BatchFields): index s is this process's rows of step s
    iterate       [start:end] -> .to_iter_dataset(ReadOptions(num_threads, prefetch))
                  [-> .mp_prefetch(MultiprocessingOptions(workers))]
    to devices    jax.make_array_from_process_local_data, on the consumer's thread

Each process reads only the rows its devices hold, so any topology, thread or worker count sees
the same examples in the same steps; resuming at step k needs nothing but k (Principles 1 and 2).
The iterator's state goes into every checkpoint, and a resume checks it against the step.
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cpt_jax.config import ConfigError
from cpt_jax.data import mixture as mixture_lib
from cpt_jax.data import sources as sources_lib
from cpt_jax.data.synthetic import SyntheticWalks

# The batch contract with the trainer: every field is [rows, train.seq_len].
BATCH_DTYPES: dict[str, Any] = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}
BATCH_KEYS = tuple(BATCH_DTYPES)


def batch_specs(batch_size: int, seq_len: int, sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch (what the train step is compiled for)."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), v, sharding=sharding) for k, v in BATCH_DTYPES.items()}


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
    # The shard shape of a batch that always divides: n devices split no dimension more than n ways.
    n = len(sharding.device_set)
    shards = (n * global_batch) // sharding.shard_shape((n * global_batch, n))[0]
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) and sharding.spec[0] is not None:
        axes = sharding.spec[0]
        return shards, f"mesh axes {(axes,) if isinstance(axes, str) else tuple(axes)}"
    return shards, "the batch sharding"


class BatchFields:
    """A grain map: examples [rows, seq_len + 1] -> the batch fields of BATCH_DTYPES.

    Inputs and targets are the examples shifted by one. With `eos_id`, a document segment starts
    at position 0 and right after every EOS (the EOS ends its document; a document that starts
    with BOS has it at its position 0); without, every row is one segment (generated data).
    """

    def __init__(self, eos_id: int | None):
        self.eos_id = eos_id

    def __call__(self, examples: np.ndarray) -> dict[str, np.ndarray]:
        examples = np.asarray(examples)
        tokens = np.asarray(examples, dtype=np.int32)  # a copy only when stored narrower (uint16)
        inputs = tokens[:, :-1]
        if self.eos_id is None:
            segment_ids = np.ones(inputs.shape, np.int32)
            positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape).copy()
        else:
            # Searched in the stored examples: contiguous, and 2 bytes a token rather than 4.
            segment_ids, positions = sources_lib.segment_ids_and_positions(examples, self.eos_id, inputs.shape[1])
        return {"inputs": inputs, "targets": tokens[:, 1:], "segment_ids": segment_ids, "positions": positions,
                "loss_mask": np.ones(inputs.shape, np.float32)}


class Pipeline:
    """Batches of a run, a pure function of (config, seed, step). See the module docstring.

    Args:
      cfg: the whole config (train.*, data.*, model.vocab_size, seed).
      schedule: the run's `schedules.Schedule` (mixture phases resolve through it).
      batch_sharding: sharding of [batch, length] arrays; None: this process holds the whole
        batch and `global_batch` returns single-device arrays (tests, benchmarks).
    """

    def __init__(self, cfg: Any, schedule: Any, batch_sharding: jax.sharding.Sharding | None = None):
        self.cfg = cfg
        self.batch_sharding = batch_sharding
        self.batch_size, self.seq_len = int(cfg.train.batch_size), int(cfg.train.seq_len)
        self.rows = self._check_topology()
        self.tokenizer_fingerprint: str | None = None
        self.sources: list[sources_lib.Source] = []
        if cfg.data.kind == mixture_lib.SYNTHETIC:
            draws = [grain.MapDataset.range(sys.maxsize)]
            batch_fn, eos_id = SyntheticWalks(cfg.seed, self.seq_len, cfg.model.vocab_size,
                                              cfg.data.synthetic_branching), None
        elif cfg.data.kind == "mixture":
            eos_id = self._load_sources(cfg)
            draws, batch_fn = [s.draws(cfg.seed) for s in self.sources], None
        else:
            raise ConfigError(f"data.kind: {cfg.data.kind!r}, expected one of 'synthetic', 'mixture'")
        self.mixture = mixture_lib.from_config(cfg, schedule)
        selection = mixture_lib.ProcessSelection(self.mixture, self.rows, cfg.train.steps)
        examples = grain.MapDataset.select_from_datasets(draws, selection)
        rows = self.rows.stop - self.rows.start
        # index s: this process's rows of step s, as examples [rows, seq_len + 1] and as batch fields
        self.examples = examples.batch(rows, drop_remainder=True, batch_fn=batch_fn)
        self.fields = BatchFields(eos_id)
        self.batches = self.examples.map(self.fields)

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

    def _load_sources(self, cfg: Any) -> int:
        """Opens and checks data.sources; returns the EOS id that ends their documents."""
        from cpt_jax.data.tokenization import load_tokenizer

        if not cfg.data.tokenizer:
            raise ConfigError(
                "data.tokenizer: empty, expected the tokenizer file the sources were prepared with "
                "(when data.kind is 'mixture')"
            )
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.tokenizer_fingerprint = tokenizer.fingerprint
        for directory in cfg.data.sources.values():
            source = sources_lib.load_source(directory)
            source.check_compatible(
                tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=cfg.model.vocab_size, seq_len=self.seq_len
            )
            self.sources.append(source)
        sources_lib.starts_with_bos([(s.manifest_path, s.manifest) for s in self.sources])
        return int(tokenizer.eos_id)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`'s batch as numpy arrays (see BATCH_DTYPES)."""
        return self.batches[int(step)]

    def to_global(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays with the batch sharding."""
        if self.batch_sharding is None:
            return jax.device_put(host)
        shape = (self.batch_size, self.seq_len)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, shape) for k, v in host.items()}

    def global_batch(self, step: int) -> dict[str, jax.Array]:
        """Step `step`'s batch as global arrays with the batch sharding."""
        return self.to_global(self.host_batch(step))

    def iterate(self, start_step: int, end_step: int, to_devices: bool = True) -> Batches:
        """(step, global batch) for steps [start_step, end_step), read ahead by grain (see Batches);
        `to_devices` False: (step, host batch)."""
        return Batches(self, int(start_step), int(end_step), to_devices)

    def check_resumed(self, step: int, where: str, saved: dict | None) -> None:
        """ConfigError when the iterator state saved in checkpoint `step` (None: none saved for this
        number of processes, whose position is rebuilt from the step) stands at another step."""
        if saved is not None and saved.get("step") != step:
            raise ConfigError(f"{where}: the data iterator's state is at step {saved.get('step')}, expected step "
                              f"{step} (the checkpoint's step); the checkpoint is inconsistent, resume from an "
                              "earlier step or move this one away")


class Batches:
    """grain's iterator over steps [start, end) of a Pipeline, yielding (step, global batch).

    `data.num_threads` threads read ahead up to `data.prefetch` batches (at least one per thread);
    with `data.workers > 0`, worker processes do (each with those threads), every worker building
    whole steps of the global index space: the same batches in the same order. Close it (or use it
    as a context manager) to stop the threads and workers.
    """

    def __init__(self, pipeline: Pipeline, start: int, end: int, to_devices: bool = True):
        data = pipeline.cfg.data
        read = grain.ReadOptions(num_threads=data.num_threads,
                                 prefetch_buffer_size=max(data.prefetch, data.num_threads))
        if data.workers == 0:
            ds = pipeline.batches[start:end].to_iter_dataset(read)
        else:
            if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag there and fails if unparsed
                flags.FLAGS.mark_as_parsed()
            # Workers send the examples (2 bytes a token), this process makes the fields (18 bytes a
            # token): between processes, bytes cost more than the few array passes of the fields.
            ds = pipeline.examples[start:end].to_iter_dataset(read).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=data.workers, per_worker_buffer_size=data.prefetch)
            ).map(pipeline.fields)
        self._to_global = pipeline.to_global if to_devices else lambda host: host
        self._start = self._next = start
        self._iterator = iter(ds)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[int, dict[str, Any]]:
        host = next(self._iterator)
        self._next += 1
        return self._next - 1, self._to_global(host)

    def get_state(self) -> dict[str, Any]:
        """grain's state of the iterator and the step it stands at (the next step it hands out):
        what a checkpoint saves as its cross-check of the step."""
        return {"step": self._next, "start_step": self._start, "grain": self._iterator.get_state()}

    def close(self) -> None:
        """Stops grain's reading threads and worker processes."""
        self._iterator.close()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
