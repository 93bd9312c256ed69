"""Tokenize documents into packed fixed-length examples: the on-disk format every source of a run uses.

Inputs (`--input`, repeatable, read in the order given):
  jsonl:GLOB[:FIELD]                      one JSON object per line, the text in FIELD (default 'text')
  text:GLOB                               one document per file
  parquet:GLOB[:COLUMN]                   Parquet files (FineWeb, RedPajama, most hub datasets), the
                                          text in string column COLUMN (default 'text')
  arrow:DIR[:COLUMN]                      the .arrow files of a `datasets.Dataset.save_to_disk`
                                          directory (Arrow IPC streams), read like Parquet
  tfds:NAME[/CONFIG][:SPLIT][:FEATURE]    a TFDS dataset already prepared in array_record format
                                          (SPLIT default 'train', FEATURE default 'text'; no download)

Every document is tokenized (in worker processes, batch encoding), preceded by BOS when the
tokenizer itself starts texts with it (`bos`: 'auto'; 'always' or 'never' override), followed by
EOS, concatenated with the others and cut into examples of seq_len + 1 tokens (inputs and shifted
targets); the trailing partial example is dropped. Because every document ends with EOS, document
boundaries (segment ids) follow from the EOS positions; a document's BOS is its first token. The
last `val_examples` examples form the validation split, so train and val never share an example.

Output directory:
  train-XXXXX-of-YYYYY.array_record   one record per example: the raw little-endian tokens
  val.array_record                    the held-out examples, same record format
  manifest.json                       what `sources.load_source` and the trainer check

The output is written to a hidden directory beside DIR and renamed to DIR at the end, so an
interrupted prepare never leaves a half-made DIR; DIR must be new or empty.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter

from cpt_jax.config import ConfigError, first_line
from cpt_jax.data.tokenizer import Tokenizer, describe, load_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VAL_FILE = "val.array_record"
# One record per chunk so that a random read decodes one example, not a group of them; no
# compression because token ids compress poorly and readers should not pay for decompression.
RECORD_OPTIONS = "group_size:1,uncompressed"
SPEC_HELP = ("jsonl:GLOB[:FIELD], text:GLOB, parquet:GLOB[:COLUMN], arrow:DIR[:COLUMN] or "
             "tfds:NAME[/CONFIG][:SPLIT][:FEATURE]")
BOS_CHOICES = ("auto", "always", "never")
# Held out by default: what an in-loop evaluation reads of each source by default (eval.examples_per_source).
DEFAULT_VAL_EXAMPLES = 64

# Work unit sizes. A task is about this much text: large enough that the cost of shipping it to a
# worker and back is small next to tokenizing it, small enough to keep every worker busy and the
# memory in flight bounded (at most 2 * workers + 1 tasks are outstanding).
TASK_BYTES = 1 << 20
TASK_FILES = 1024
TASK_TFDS_RECORDS = 1024
ARROW_BATCH_ROWS = 1024
SHARD_BYTES = 256 << 20
# 'spawn' because the caller may be a process with JAX (and its threads) loaded, where fork is unsafe.
MP_START_METHOD = "spawn"


# ----------------------------------------------------------------------------------------------
# Input specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A parsed `--input`: kind 'jsonl', 'text', 'parquet', 'arrow' or 'tfds' and its parts."""

    spec: str
    kind: str
    pattern: str = ""  # jsonl/text/parquet: the glob; arrow: the directory
    field: str = "text"  # jsonl: the JSON key holding the text; parquet/arrow: the column
    tfds_name: str = ""
    tfds_config: str = ""
    split: str = "train"  # tfds: a split name, optionally sliced: train[:10%]
    feature: str = "text"  # tfds: the text feature


_TFDS_RE = re.compile(
    r"^(?P<name>[^:/\[\]]+)(?:/(?P<config>[^:/\[\]]+))?"
    r"(?::(?P<split>[^:\[\]]*(?:\[[^\]]*\])?))?(?::(?P<feature>[^:\[\]]+))?$")


def parse_input(spec: str) -> InputSpec:
    """Parse one `--input` spec (see the module docstring). ConfigError when malformed."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(f"--input {spec!r}: not a spec, expected {SPEC_HELP}")
    if kind in ("jsonl", "parquet", "arrow"):
        pattern, field = rest, "text"
        head, sep, tail = rest.rpartition(":")
        # A trailing ':name' is the field, unless it looks like part of a path.
        if sep and head and tail and "/" not in tail and "*" not in tail:
            pattern, field = head, tail
        return InputSpec(spec, kind, pattern=pattern, field=field)
    if kind == "text":
        return InputSpec(spec, "text", pattern=rest)
    if kind == "tfds":
        m = _TFDS_RE.match(rest)
        if not m:
            raise ConfigError(f"--input {spec!r}: not a TFDS spec, expected tfds:NAME[/CONFIG][:SPLIT][:FEATURE]")
        return InputSpec(spec, "tfds", tfds_name=m["name"], tfds_config=m["config"] or "",
                         split=m["split"] or "train", feature=m["feature"] or "text")
    raise ConfigError(f"--input {spec!r}: unknown kind {kind!r}, expected {SPEC_HELP}")


@dataclasses.dataclass(frozen=True)
class _TfdsInput:
    version_dir: str
    split: str
    feature: str
    label: str  # how error messages name the dataset
    num_records: int


def default_tfds_data_dir() -> str:
    """Where TFDS keeps prepared datasets when --tfds_data_dir is not given."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split("."))


def _resolve_tfds(spec: InputSpec, data_dir: str | None) -> _TfdsInput:
    """Find a prepared array_record TFDS dataset on disk, without network or dataset code."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_tfds_data_dir()))
    label = f"tfds dataset {spec.tfds_name + ('/' + spec.tfds_config if spec.tfds_config else '')!r}"
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--tfds_data_dir {data_dir}: no such directory, expected the data dir where "
                          f"{label} was prepared")
    dataset_dir = os.path.join(data_dir, spec.tfds_name, *([spec.tfds_config] if spec.tfds_config else []))
    versions = []
    subdirs = []
    if os.path.isdir(dataset_dir):
        for entry in sorted(os.listdir(dataset_dir)):
            if re.fullmatch(r"\d+\.\d+\.\d+", entry):
                if os.path.isfile(os.path.join(dataset_dir, entry, "dataset_info.json")):
                    versions.append(entry)
            elif os.path.isdir(os.path.join(dataset_dir, entry)) and not entry.startswith("incomplete"):
                subdirs.append(entry)
    if not versions:
        if subdirs and not spec.tfds_config:
            raise ConfigError(f"{label} in {data_dir}: has configs {', '.join(subdirs)}, expected one named "
                              f"as tfds:{spec.tfds_name}/CONFIG")
        raise ConfigError(f"{label} is not prepared in {data_dir} (no {dataset_dir}/<version>/dataset_info.json), "
                          "expected it prepared in array_record format (prepare never downloads)")
    version_dir = os.path.join(dataset_dir, max(versions, key=_version_key))

    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(version_dir)
        info = builder.info
    except Exception as e:  # a corrupt dataset_info.json surfaces as any of several TFDS errors
        raise ConfigError(f"{label} in {data_dir}: unreadable ({first_line(e)}), "
                          "expected a prepared TFDS dataset") from None
    file_format = getattr(info.file_format, "value", info.file_format)
    if file_format != "array_record":
        raise ConfigError(f"{label} in {data_dir}: prepared as {file_format}, expected array_record (prepare it "
                          "with file_format='array_record'; TFRecord needs TensorFlow and has no random access)")
    split_name = spec.split.split("[", 1)[0]
    if split_name not in info.splits:
        raise ConfigError(f"{label} in {data_dir}: no split {split_name!r}, expected one of "
                          f"{', '.join(sorted(info.splits.keys()))}")
    features = info.features
    if spec.feature not in features:
        raise ConfigError(f"{label} in {data_dir}: no feature {spec.feature!r}, expected one of "
                          f"{', '.join(sorted(features.keys()))}")
    if not isinstance(features[spec.feature], tfds.features.Text):
        dtype = getattr(features[spec.feature], "np_dtype", None)
        if dtype is None or np.dtype(dtype).kind not in "OSU":
            raise ConfigError(f"{label} in {data_dir}: feature {spec.feature!r} is "
                              f"{type(features[spec.feature]).__name__}, expected a Text feature")
    try:
        num_records = len(builder.as_data_source(split=spec.split))
    except Exception as e:  # a malformed split slice ('train[:x]') is reported by TFDS as several types
        raise ConfigError(f"{label} in {data_dir}: split {spec.split!r} unusable "
                          f"({first_line(e)})") from None
    return _TfdsInput(version_dir, spec.split, spec.feature, f"{label} split {spec.split}", num_records)


def _arrow_files(spec: InputSpec) -> list[str]:
    """The .arrow files of a `save_to_disk` directory, in the order its state.json lists them."""
    directory = os.path.abspath(os.path.expanduser(spec.pattern))
    if not os.path.isdir(directory):
        raise ConfigError(f"--input {spec.spec}: {directory} is not a directory, expected one written by "
                          "datasets.Dataset.save_to_disk")
    try:
        with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
            files = [os.path.join(directory, d["filename"]) for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):  # no usable state.json: every .arrow file, by name
        files = sorted(glob.glob(os.path.join(directory, "*.arrow")))
    if not files:
        raise ConfigError(f"--input {spec.spec}: no .arrow files in {directory}, expected a directory written by "
                          "datasets.Dataset.save_to_disk")
    return files


def _arrow_schema(kind: str, path: str) -> pa.Schema:
    try:
        if kind == "parquet":
            return pq.read_schema(path)
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).schema
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable {kind} file ({first_line(e)})") from None


def _check_text_column(kind: str, path: str, column: str) -> None:
    """ConfigError unless the file's schema has `column` as a string column (read from its footer or
    header only, so every file is checked before any is tokenized)."""
    schema = _arrow_schema(kind, path)
    if column not in schema.names:
        raise ConfigError(f"{path}: no column {column!r}, expected one of {', '.join(schema.names[:12])} "
                          f"(name it as --input {kind}:PATH:COLUMN)")
    dtype = schema.field(column).type
    if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)):
        raise ConfigError(f"{path}: column {column!r} is {dtype}, expected a string column of text")


def _resolve(spec: InputSpec, tfds_data_dir: str | None) -> list[str] | _TfdsInput:
    """The files a jsonl/text/parquet/arrow spec names (sorted), or the TFDS dataset a tfds spec names."""
    if spec.kind == "tfds":
        return _resolve_tfds(spec, tfds_data_dir)
    if spec.kind == "arrow":
        files = _arrow_files(spec)
        for path in files:
            _check_text_column("arrow", path, spec.field)
        return files
    pattern = os.path.expanduser(spec.pattern)
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise ConfigError(f"--input {spec.spec}: the glob {pattern!r} matches no file, expected at least one")
    for path in files if spec.kind == "parquet" else ():
        _check_text_column("parquet", path, spec.field)
    return files


# ----------------------------------------------------------------------------------------------
# Tasks: a unit of work a worker reads and tokenizes. Plain tuples so they pickle cheaply.
# ----------------------------------------------------------------------------------------------


def _jsonl_tasks(path: str, field: str) -> Iterator[tuple]:
    """Blocks of whole lines (about TASK_BYTES each) with the number of their first line."""
    line = 1
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(TASK_BYTES)
            if not block:
                break
            data = rest + block if rest else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                rest = data
                continue
            chunk, rest = data[:cut], data[cut:]
            yield ("jsonl", path, line, chunk, field)
            line += chunk.count(b"\n")
    if rest:
        yield ("jsonl", path, line, rest, field)


def _text_tasks(files: list[str]) -> Iterator[tuple]:
    group: list[str] = []
    size = 0
    for path in files:
        group.append(path)
        size += os.path.getsize(path)
        if size >= TASK_BYTES or len(group) >= TASK_FILES:
            yield ("text", tuple(group))
            group, size = [], 0
    if group:
        yield ("text", tuple(group))


def _record_batches(kind: str, path: str, column: str) -> Iterator[pa.RecordBatch]:
    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[column])
        return
    with pa.memory_map(path) as source:
        yield from pa.ipc.open_stream(source)


def _arrow_tasks(kind: str, path: str, column: str) -> Iterator[tuple]:
    """The column's texts in blocks of about TASK_BYTES, read by pyarrow record batches (in this
    process: decoding columnar files is fast next to tokenizing them)."""
    first, texts, size = 0, [], 0
    try:
        for batch in _record_batches(kind, path, column):
            values = batch.column(column)
            texts += values.to_pylist()
            size += int(pc.sum(pc.binary_length(values)).as_py() or 0)
            if size >= TASK_BYTES:
                yield ("texts", path, first, tuple(texts), size)
                first, texts, size = first + len(texts), [], 0
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: unreadable at row {first + len(texts)} ({first_line(e)})") from None
    if texts:
        yield ("texts", path, first, tuple(texts), size)


def _tasks(resolved: list[tuple[InputSpec, list[str] | _TfdsInput]]) -> Iterator[tuple]:
    for spec, target in resolved:
        if isinstance(target, _TfdsInput):
            for start in range(0, target.num_records, TASK_TFDS_RECORDS):
                stop = min(start + TASK_TFDS_RECORDS, target.num_records)
                yield ("tfds", target.version_dir, target.split, target.feature, target.label, start, stop)
        elif spec.kind == "jsonl":
            for path in target:
                yield from _jsonl_tasks(path, spec.field)
        elif spec.kind in ("parquet", "arrow"):
            for path in target:
                yield from _arrow_tasks(spec.kind, path, spec.field)
        else:
            yield from _text_tasks(target)


def _resolve_all(inputs: Sequence[str], tfds_data_dir: str | None) -> list[tuple[InputSpec, list[str] | _TfdsInput]]:
    if not inputs:
        raise ConfigError(f"--input: none given, expected at least one {SPEC_HELP}")
    resolved = []
    for spec in inputs:
        parsed = parse_input(spec)
        resolved.append((parsed, _resolve(parsed, tfds_data_dir)))
    return resolved


def iter_documents(inputs: Sequence[str], skip_bad_records: bool = False,
                   tfds_data_dir: str | None = None) -> Iterator[str]:
    """The non-empty documents of `inputs` in order, as prepare reads them (for tokenizer training).

    The specs are checked before this returns; bad records raise ConfigError while iterating
    (or are skipped with `skip_bad_records`).
    """
    resolved = _resolve_all(inputs, tfds_data_dir)

    def documents() -> Iterator[str]:
        for task in _tasks(resolved):
            docs, _ = _read_task(task, _Bad(skip_bad_records))
            yield from (d for d in docs if d)

    return documents()


@dataclasses.dataclass
class _Chunk:
    """What a worker returns for one task."""

    tokens: np.ndarray  # the task's documents, each followed by EOS, in the token dtype
    documents: int
    empty_documents: int
    text_bytes: int
    skipped: int


class _Bad:
    """Reports a bad record: raises ConfigError, or counts it when bad records are skipped."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise ConfigError(message)
        self.count += 1


def _read_jsonl(path: str, first_line: int, data: bytes, field: str, bad: _Bad) -> tuple[list[str], int]:
    lines: list[str | UnicodeDecodeError]
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        # Rare: find the undecodable lines, and report them in line order with the other errors.
        lines = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                lines.append(e)
    docs: list[str] = []
    size = 0
    for i, line in enumerate(lines):
        if isinstance(line, UnicodeDecodeError):
            bad(f"{path}:{first_line + i}: not valid UTF-8 (byte {line.start} of the line), expected UTF-8 text "
                "(--skip_bad_records skips such lines)")
            continue
        if not line or line.isspace():
            continue
        loc = f"{path}:{first_line + i}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            bad(f"{loc}: not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}), "
                "expected one JSON object per line (--skip_bad_records skips such lines)")
            continue
        if not isinstance(obj, dict) or field not in obj:
            found = (f"an object with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, dict)
                     else f"a JSON {type(obj).__name__}")
            bad(f"{loc}: {found}, expected an object with field {field!r} (--skip_bad_records skips such lines)")
            continue
        value = obj[field]
        if not isinstance(value, str):
            bad(f"{loc}: field {field!r} is a JSON {type(value).__name__}, expected a string "
                "(--skip_bad_records skips such lines)")
            continue
        try:
            size += len(value.encode("utf-8"))
        except UnicodeEncodeError as e:
            # A JSON escape such as \ud800 decodes to a lone surrogate, which no tokenizer accepts.
            bad(f"{loc}: field {field!r} is not valid UTF-8 text (lone surrogate at character {e.start}), "
                "expected UTF-8 text (--skip_bad_records skips such lines)")
            continue
        docs.append(value)
    return docs, size


def _read_text(paths: Sequence[str], bad: _Bad) -> tuple[list[str], int]:
    docs: list[str] = []
    size = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: unreadable ({e.strerror}), expected a readable text file") from None
        try:
            docs.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad(f"{path}: not valid UTF-8 (byte offset {e.start}), expected UTF-8 text "
                "(--skip_bad_records skips such files)")
            continue
        size += len(data)
    return docs, size


_TFDS_SOURCES: dict[tuple[str, str], Any] = {}


def _read_tfds(version_dir: str, split: str, feature: str, label: str, start: int, stop: int,
               bad: _Bad) -> tuple[list[str], int]:
    source = _TFDS_SOURCES.get((version_dir, split))
    if source is None:
        import tensorflow_datasets as tfds

        source = tfds.builder_from_directory(version_dir).as_data_source(split=split)
        _TFDS_SOURCES[(version_dir, split)] = source
    records = source.__getitems__(list(range(start, stop)))
    docs: list[str] = []
    size = 0
    for index, record in zip(range(start, stop), records, strict=True):
        value = record[feature]
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        if not isinstance(value, bytes):
            raise ConfigError(f"{label} record {index}: feature {feature!r} is {type(value).__name__}, "
                              "expected text")
        try:
            docs.append(value.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad(f"{label} record {index}: feature {feature!r} is not valid UTF-8 (byte {e.start}), expected "
                "UTF-8 text (--skip_bad_records skips such records)")
            continue
        size += len(value)
    return docs, size


_TOKENIZER: dict[str, Tokenizer] = {}


def _tokenizer(path: str, fingerprint: str) -> Tokenizer:
    tok = _TOKENIZER.get(fingerprint)
    if tok is None:
        tok = load_tokenizer(path)
        if tok.fingerprint != fingerprint:
            raise ConfigError(f"tokenizer {path}: changed while prepare was running (sha256 {tok.fingerprint[:16]}, "
                              f"expected {fingerprint[:16]})")
        _TOKENIZER[fingerprint] = tok
    return tok


def _read_task(task: tuple, bad: _Bad) -> tuple[list[str], int]:
    """(the task's documents, their UTF-8 size in bytes)."""
    kind = task[0]
    if kind == "jsonl":
        return _read_jsonl(*task[1:], bad=bad)
    if kind == "text":
        return _read_text(task[1], bad)
    if kind == "tfds":
        return _read_tfds(*task[1:], bad=bad)
    if kind == "texts":  # a null is a document without text
        return ["" if t is None else t for t in task[3]], task[4]
    raise ValueError(f"unknown task kind {kind!r}")


def _process_task(task: tuple, tokenizer_path: str, fingerprint: str, skip_bad_records: bool,
                  add_bos: bool = False) -> _Chunk:
    """Read one task's documents and tokenize them (runs in a worker process)."""
    bad = _Bad(skip_bad_records)
    docs, text_bytes = _read_task(task, bad)
    # An empty document would only add a lone EOS: count it, do not emit it.
    nonempty = [d for d in docs if d]
    tokens = _tokenizer(tokenizer_path, fingerprint).encode_documents(nonempty, num_threads=1, add_bos=add_bos)
    return _Chunk(tokens, len(nonempty), len(docs) - len(nonempty), text_bytes, bad.count)


def _init_worker() -> None:
    # The `tokenizers` package would start a thread per core in every worker; the workers are the
    # parallelism. Must be set before its thread pool starts (first encode).
    os.environ["RAYON_NUM_THREADS"] = "1"


class _Runner:
    """Runs tasks in order: in this process for one worker, else in a process pool with a bounded
    number of tasks in flight (reading stays ahead of the workers without reading everything)."""

    def __init__(self, workers: int, context: tuple[str, str, bool, bool]):
        self.workers = workers
        self.context = context
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(MP_START_METHOD),
                                            initializer=_init_worker)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is not None:
            # On an error, do not wait for the tasks still queued: cancel them.
            self.pool.shutdown(wait=exc_type is None, cancel_futures=True)

    def map(self, tasks: Iterator[tuple]) -> Iterator[_Chunk]:
        if self.pool is None:
            for task in tasks:
                yield _process_task(task, *self.context)
            return
        pending: collections.deque[Future] = collections.deque()
        for task in tasks:
            pending.append(self.pool.submit(_process_task, task, *self.context))
            if len(pending) > 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    """File name of train shard `index` of `count`."""
    return f"train-{index:05d}-of-{count:05d}.array_record"


class _ExampleWriter:
    """Writes examples to train shards, holding back the last `val_examples` for the val split.

    The total is unknown until the input ends, so the newest `val_examples` examples wait in a
    queue and an example is written to train only once that many newer ones exist.
    """

    def __init__(self, directory: str, examples_per_shard: int, val_examples: int):
        self.directory = directory
        self.examples_per_shard = examples_per_shard
        self.val_examples = val_examples
        self.held: collections.deque[np.ndarray] = collections.deque()
        self.writer = None
        self.shard_sizes: list[int] = []

    def add(self, rows: np.ndarray) -> None:
        for row in rows:
            if self.val_examples:
                self.held.append(row)
                if len(self.held) <= self.val_examples:
                    continue
                row = self.held.popleft()
            self._write_train(row)

    def _write_train(self, row: np.ndarray) -> None:
        if self.writer is None:
            path = os.path.join(self.directory, f"train-{len(self.shard_sizes):05d}.partial")
            self.writer = ArrayRecordWriter(path, RECORD_OPTIONS)
            self.shard_sizes.append(0)
        self.writer.write(row.tobytes())
        self.shard_sizes[-1] += 1
        if self.shard_sizes[-1] == self.examples_per_shard:
            self.writer.close()
            self.writer = None

    @property
    def total(self) -> int:
        return sum(self.shard_sizes) + len(self.held)

    def finish(self) -> list[str]:
        """Close the shards, give them their final names, write val. Returns the shard names."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        names = [shard_name(i, len(self.shard_sizes)) for i in range(len(self.shard_sizes))]
        for i, name in enumerate(names):
            os.rename(os.path.join(self.directory, f"train-{i:05d}.partial"), os.path.join(self.directory, name))
        writer = ArrayRecordWriter(os.path.join(self.directory, VAL_FILE), RECORD_OPTIONS)
        for row in self.held:
            writer.write(row.tobytes())
        writer.close()
        return names

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Progress:
    """Documents and tokens per second on one stderr line, redrawn at most 5 times a second; only
    when stderr is a terminal (logs of batch jobs get the final summary only)."""

    def __init__(self, name: str):
        self.enabled = sys.stderr.isatty()
        self.name = name
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, documents: int, tokens: int, examples: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        sys.stderr.write(f"\rprepare {self.name}: {documents:,} docs ({documents / dt:,.0f}/s), "
                         f"{tokens:,} tokens ({tokens / dt:,.0f}/s), {examples:,} examples\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


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


def resolve_bos(choice: str, tok: Tokenizer) -> bool:
    """Whether documents start with BOS for `--bos` auto (the tokenizer's own convention), always
    or never. ConfigError for an unknown choice or 'always' without a BOS to add."""
    if choice not in BOS_CHOICES:
        raise ConfigError(f"--bos: {choice!r}, expected one of {', '.join(BOS_CHOICES)}")
    if choice == "always" and tok.bos_id is None:
        raise ConfigError(f"--bos always: tokenizer {tok.path} has no BOS token, expected one (use --bos auto or "
                          "never)")
    if choice == "always" and tok.bos_id == tok.eos_id:
        raise ConfigError(f"--bos always: tokenizer {tok.path}'s BOS is its EOS (id {tok.eos_id}), which already "
                          "separates the documents; expected --bos auto or never")
    # A BOS that is also the EOS would end a document where it starts: the EOS before it serves.
    return choice == "always" or (choice == "auto" and tok.adds_bos and tok.bos_id != tok.eos_id)


def prepare(inputs: list[str], tokenizer_path: str, seq_len: int, out_dir: str,
            val_examples: int = DEFAULT_VAL_EXAMPLES, workers: int = 1, name: str | None = None,
            skip_bad_records: bool = False, tfds_data_dir: str | None = None, *,
            examples_per_shard: int | None = None, bos: str = "auto") -> dict:
    """Tokenize and pack `inputs` into `out_dir`; returns the manifest (also in out_dir/manifest.json).

    Args:
      inputs: specs, see the module docstring; read in this order.
      tokenizer_path: sentencepiece .model or tokenizer.json (or a directory holding one).
      seq_len: tokens a training sequence has; examples hold seq_len + 1 (inputs and targets).
      out_dir: must not exist or be empty.
      val_examples: examples held out (the last ones) for the val split; fewer than the total.
        Default 64, what an in-loop evaluation reads of a source by default.
      workers: tokenizer processes; 1 tokenizes in this process.
      name: the source's name (default: the basename of out_dir).
      skip_bad_records: skip and count bad JSONL lines, non-UTF-8 records, instead of failing.
      tfds_data_dir: where tfds: inputs are prepared (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
      examples_per_shard: train examples per shard (default: shards of about 256 MiB).
      bos: 'auto' (BOS before every document when the tokenizer itself adds one: sentencepiece
        models with a BOS piece, as Llama 2; tokenizer.json whose tokenizer_config.json says
        add_bos_token or whose template starts with BOS, as Llama 3 and Mistral), 'always', 'never'.

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
    resolved = _resolve_all(inputs, tfds_data_dir)
    length = seq_len + 1
    dtype = tok.dtype.newbyteorder("<")
    if examples_per_shard is None:
        examples_per_shard = max(1, SHARD_BYTES // (length * dtype.itemsize))
    examples_per_shard = _positive("examples_per_shard", examples_per_shard, 1)
    # The main process already has the tokenizer; the in-process path reuses it. TFDS readers are
    # not reused across calls: a dataset may have been prepared again in place.
    _TOKENIZER[tok.fingerprint] = tok
    _TFDS_SOURCES.clear()

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.incomplete-", dir=parent)
    writer = _ExampleWriter(tmp, examples_per_shard, val_examples)
    progress = _Progress(name)
    documents = empty_documents = text_bytes = skipped = document_tokens = 0
    carry = np.empty(0, dtype)
    try:
        with _Runner(workers, (tok.path, tok.fingerprint, skip_bad_records, add_bos)) as runner:
            for chunk in runner.map(_tasks(resolved)):
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
        progress.update(documents, document_tokens, writer.total, final=True)
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
        writer.abort()
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
