"""A prepared source (the output of `cpt_jax.prepare`) as random-access grain datasets, and the
pure functions that decide its order: per-epoch permutations and segment ids.

The k-th draw from a source of n examples is record `perm(epoch=k // n)[k % n]`, each epoch's
permutation seeded by a stable hash of (seed, name, epoch): a function of those alone, never of the
topology or of iterator state. A source repeats when exhausted; every epoch visits every example
once. `Source.draws` is that order as grain transforms.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from cpt_jax.config import ConfigError, first_line
from cpt_jax.data.packing import FORMAT_VERSION, MANIFEST, VAL_FILE

_DTYPES = ("uint16", "uint32")
# The manifest keys every reader relies on, and their types.
_REQUIRED = {"format_version": int, "name": str, "tokenizer_fingerprint": str, "vocab_size": int, "eos_id": int,
             "seq_len": int, "dtype": str, "examples": int, "val_examples": int, "shards": list}


class _DecodeRecord:
    """Record bytes -> the example's tokens (a picklable callable, so grain workers can use it).

    The tokens are a read-only view of the record's bytes, not a copy: the batch that stacks them
    makes the array the trainer reads (a big-endian host gets a native copy)."""

    def __init__(self, dtype: str, length: int):
        self.dtype = np.dtype(dtype)
        self.stored = self.dtype.newbyteorder("<")  # records are little-endian
        self.length = length

    def __call__(self, record: bytes) -> np.ndarray:
        tokens = np.frombuffer(record, dtype=self.stored)
        if tokens.size != self.length:
            raise ValueError(f"record of {tokens.size} tokens, expected {self.length}")
        return tokens if tokens.dtype.isnative else tokens.astype(self.dtype)


class DataError(ConfigError):
    """A prepared file found unreadable while a run reads it (a damaged shard): reported as one line."""


class _Shards(grain.sources.ArrayRecordDataSource):
    """grain's ArrayRecord source over a split's files, naming the file when a read fails (the
    reader's own error names neither the file nor the record)."""

    def __init__(self, paths: list[str], counts: list[int]):
        # "file[0:n]" hands the source the record counts load_source has just read (it need not open
        # every file again). Each read is served in the calling thread: reads are single records, for
        # which the reader's thread pool costs more than it saves (and competes with the train step).
        super().__init__([f"{p}[0:{n}]" for p, n in zip(paths, counts, strict=True)],
                         reader_options={"max_parallelism": "0"})
        self._starts = [0, *itertools.accumulate(counts)]

    def __getitem__(self, key: int) -> bytes:
        try:
            return super().__getitem__(key)
        except RuntimeError as e:
            shard = bisect.bisect_right(self._starts, int(key)) - 1
            raise DataError(f"{self.paths[shard]}: record {int(key) - self._starts[shard]} unreadable "
                            f"({first_line(e)}); the file is damaged, prepare the source again") from None


class EpochShuffle(grain.MapDataset):
    """Index k -> the parent's record `epoch_permutation(seed, name, k // n)[k % n]`: a new order
    every epoch (like grain's `shuffle`), stable across processes, hosts and library versions."""

    def __init__(self, parent: grain.MapDataset, seed: int, name: str):
        super().__init__(parent)
        self._seed, self._name, self._n = int(seed), str(name), len(parent)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[record_index(self._seed, self._name, self._n, index)]


@dataclasses.dataclass
class Source:
    """One split ('train' or 'val') of a prepared source: its manifest and `dataset`, a grain.MapDataset
    of its `num_examples` examples (read-only arrays of seq_len + 1 tokens in the manifest dtype)."""

    name: str
    directory: str
    split: str
    manifest: dict[str, Any]
    num_examples: int
    dataset: grain.MapDataset

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def draws(self, seed: int) -> grain.MapDataset:
        """The source's examples in the run's order: index k is the k-th draw (any k >= 0)."""
        return EpochShuffle(self.dataset, seed, self.name).repeat()

    def check_compatible(self, *, tokenizer_fingerprint: str | None, vocab_size: int, seq_len: int) -> None:
        """Raise ConfigError when this source cannot feed a model with this tokenizer, vocabulary
        size and sequence length. `tokenizer_fingerprint` None skips the tokenizer check."""
        m = self.manifest
        path = self.manifest_path
        if tokenizer_fingerprint is not None and m["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise ConfigError(
                f"{path}: tokenizer_fingerprint {m['tokenizer_fingerprint'][:16]}... (from "
                f"{m.get('tokenizer_path', '?')}), expected {tokenizer_fingerprint[:16]}... of the run's tokenizer "
                "(prepare the source again with that tokenizer)")
        if m["vocab_size"] > vocab_size:
            raise ConfigError(f"{path}: vocab_size {m['vocab_size']}, expected at most the model's vocab_size "
                              f"{vocab_size}")
        if m["seq_len"] != seq_len:
            raise ConfigError(f"{path}: seq_len {m['seq_len']}, expected {seq_len} (train.seq_len); prepare the "
                              f"source again with --seq_len {seq_len}")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of a prepared directory, checked for the keys every reader relies on."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing, expected a directory made by python -m cpt_jax.prepare")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({first_line(e)}), expected the JSON manifest written by "
                          "cpt_jax.prepare") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path}: a JSON {type(manifest).__name__}, expected a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise ConfigError(f"{path}: no key {key!r}, expected a manifest written by cpt_jax.prepare")
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} is {value!r}, expected a {kind.__name__}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ConfigError(f"{path}: format_version {manifest['format_version']}, expected {FORMAT_VERSION} "
                          "(prepare the source again with this version of cpt_jax)")
    if manifest["dtype"] not in _DTYPES:
        raise ConfigError(f"{path}: dtype {manifest['dtype']!r}, expected one of {', '.join(_DTYPES)}")
    return manifest


def load_source(directory: str | os.PathLike, split: str = "train") -> Source:
    """Open one split ('train' or 'val') of a prepared directory for random access; ConfigError when
    the manifest or a shard is missing or unreadable, the files disagree with it, or the split is empty."""
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    manifest = read_manifest(directory)
    path = os.path.join(directory, MANIFEST)
    if split == "train":
        files, expected = manifest["shards"], manifest["examples"]
    elif split == "val":
        files, expected = [manifest.get("val_file", VAL_FILE)], manifest["val_examples"]
    else:
        raise ConfigError(f"split {split!r}: unknown, expected 'train' or 'val'")
    if expected <= 0:
        raise ConfigError(f"{path}: {expected} {split} examples, expected a non-empty source")
    paths = [os.path.join(directory, f) for f in files]
    counts = []
    for p in paths:
        if not os.path.isfile(p):
            raise ConfigError(f"{p}: missing, expected the file listed in {path}")
        try:  # opening reads the file's index at its end: a truncated or damaged file fails here
            reader = ArrayRecordReader(p)
            counts.append(reader.num_records())
            reader.close()
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{p}: not a readable ArrayRecord file, truncated or damaged ({first_line(e)}); "
                              "prepare the directory again") from None
    records = _Shards(paths, counts)
    if len(records) != expected:
        raise ConfigError(f"{directory}: {len(records)} {split} records in the files, expected {expected} (from "
                          f"{path}); the directory is damaged, prepare it again")
    length = manifest["seq_len"] + 1
    itemsize = np.dtype(manifest["dtype"]).itemsize
    if len(records[0]) != length * itemsize:
        raise ConfigError(f"{paths[0]}: records of {len(records[0])} bytes, expected {length * itemsize} "
                          f"(seq_len + 1 = {length} {manifest['dtype']} tokens, from {path})")
    dataset = grain.MapDataset.source(records).map(_DecodeRecord(manifest["dtype"], length))
    return Source(manifest["name"], directory, split, manifest, expected, dataset)


def starts_with_bos(manifests: Sequence[tuple[str, dict[str, Any]]]) -> bool:
    """Whether the documents of these sources (pairs of manifest path and manifest, all made with
    one tokenizer) begin with BOS. A model trained on both conventions would learn neither: sources
    prepared with different `--bos` outcomes are a ConfigError naming two of them."""
    seen: dict[bool, str] = {}
    for path, manifest in manifests:
        seen.setdefault(bool(manifest.get("add_bos", False)), path)  # prepared before --bos existed: none
    if len(seen) > 1:
        raise ConfigError(f"{seen[True]}: add_bos true (documents start with BOS), but {seen[False]} has add_bos "
                          "false; expected one convention for all sources of a tokenizer (prepare them again with "
                          "the same --bos)")
    return bool(seen and next(iter(seen)))


def epoch_seed(seed: int, name: str, epoch: int) -> int:
    """A 64-bit seed for one epoch of one source, stable across processes, hosts and Python
    versions (sha256, not hash(), which is salted per process for strings)."""
    digest = hashlib.sha256(f"cpt_jax/epoch/{int(seed)}/{name}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# Examples are looked up one at a time: keep the permutations of the current (and next) epoch of
# up to 16 sources.
@functools.lru_cache(maxsize=32)
def epoch_permutation(seed: int, name: str, epoch: int, n: int) -> np.ndarray:
    """The order (int64 record indices, read-only) in which epoch `epoch` visits a source of n examples."""
    if n <= 0:
        raise ValueError(f"n={n}: a source needs at least one example")
    if epoch < 0:
        raise ValueError(f"epoch={epoch}: expected >= 0")
    # Argsort of raw 64-bit draws rather than Generator.permutation: a BitGenerator's raw stream is
    # fixed by its algorithm, while Generator methods may change between numpy versions, and a
    # resumed run must see the same order whatever numpy it runs with.
    keys = np.random.PCG64(epoch_seed(seed, name, epoch)).random_raw(int(n))
    perm = np.argsort(keys, kind="stable")
    perm.flags.writeable = False  # shared through the cache
    return perm


def record_index(seed: int, name: str, n: int, k: int) -> int:
    """The record read by the k-th draw (k >= 0, unbounded) from a source of n examples."""
    if k < 0:
        raise ValueError(f"k={k}: expected >= 0")
    epoch, i = divmod(int(k), int(n))
    return int(epoch_permutation(seed, name, epoch, n)[i])


def segment_ids_and_positions(tokens: np.ndarray, eos_id: int,
                              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Document segment ids and in-document positions of the first `length` tokens of each row.

    `tokens` is [..., W] (`length` defaults to W): a model's inputs, or the stored examples of
    seq_len + 1 tokens with `length` seq_len, which is faster (contiguous memory is searched
    several times faster than the view that drops the last column). Segment ids start at 1 and
    increase on the token after each EOS (the EOS itself ends its document); positions count from
    0 within each segment. Returns two int32 arrays [..., length].
    """
    tokens = np.asarray(tokens)
    width = tokens.shape[-1]
    length = width if length is None else int(length)
    if not 0 < length <= width:
        raise ValueError(f"length {length}: expected 1..{width}, the tokens' last dimension")
    shape = (*tokens.shape[:-1], length)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    # One pass finds the EOS tokens; both outputs are spread from the few segment starts after.
    row, col = np.divmod(np.flatnonzero(tokens == eos_id), width)
    keep = col < length - 1  # an EOS in the last input (or a target) starts no segment of the row
    row_starts = np.arange(rows, dtype=np.int64) * length
    starts = np.sort(np.concatenate([row_starts, row[keep] * length + col[keep] + 1]))
    lengths = np.diff(starts, append=rows * length)
    first = np.searchsorted(starts, row_starts)  # where each row's first segment is among the starts
    ids = np.arange(1, len(starts) + 1) - np.repeat(first, np.diff(first, append=len(starts)))
    segment_ids = np.repeat(ids.astype(np.int32), lengths).reshape(shape)
    positions = np.repeat((starts % length).astype(np.int32), lengths).reshape(shape)
    np.subtract(np.arange(length, dtype=np.int32), positions, out=positions)
    return segment_ids, positions
