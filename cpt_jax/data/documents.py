"""Read the documents of prepare's inputs: the `--input` specs (SPEC_HELP; the README lists them),
their files, and the text in them.

Every spec is resolved (files found, columns and TFDS features checked) before any is read. The
documents are then read in tasks, plain tuples that pickle cheaply to a worker process.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cpt_jax.config import ConfigError, first_line

SPEC_HELP = ("jsonl:GLOB[:FIELD], text:GLOB, parquet:GLOB[:COLUMN], arrow:DIR[:COLUMN] or "
             "tfds:NAME[/CONFIG][:SPLIT][:FEATURE]")


# Work unit sizes. A task is about this much text: large enough that the cost of shipping it to a
# worker and back is small next to tokenizing it, small enough to keep every worker busy and the
# memory in flight bounded (at most 2 * workers + 1 tasks are outstanding).
TASK_BYTES = 1 << 20
TASK_FILES = 1024
TASK_TFDS_RECORDS = 1024
ARROW_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A parsed `--input`: kind 'jsonl', 'text', 'parquet', 'arrow' or 'tfds' and its parts."""

    spec: str
    kind: str
    pattern: str = ""  # jsonl/text/parquet: the glob; arrow: the directory of a `Dataset.save_to_disk`
    field: str = "text"  # jsonl: the JSON key holding the text; parquet/arrow: the string column
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
class TfdsInput:
    """A resolved tfds: input: the prepared dataset on disk and the records of its split."""

    version_dir: str
    split: str
    feature: str
    label: str  # how error messages name the dataset
    num_records: int


def _resolve_tfds(spec: InputSpec, data_dir: str | None) -> TfdsInput:
    """Find a prepared array_record TFDS dataset on disk, without network or dataset code."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                                                  or "~/tensorflow_datasets"))
    label = f"tfds dataset {spec.tfds_name + ('/' + spec.tfds_config if spec.tfds_config else '')!r}"
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--tfds_data_dir {data_dir}: no such directory, expected the data dir where "
                          f"{label} was prepared")
    dataset_dir = os.path.join(data_dir, spec.tfds_name, *([spec.tfds_config] if spec.tfds_config else []))
    entries = sorted(os.listdir(dataset_dir)) if os.path.isdir(dataset_dir) else []
    versions = [e for e in entries if re.fullmatch(r"\d+\.\d+\.\d+", e)]
    subdirs = [e for e in entries if e not in versions and not e.startswith("incomplete")
               and os.path.isdir(os.path.join(dataset_dir, e))]
    versions = [v for v in versions if os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json"))]
    if not versions:
        if subdirs and not spec.tfds_config:
            raise ConfigError(f"{label} in {data_dir}: has configs {', '.join(subdirs)}, expected one named "
                              f"as tfds:{spec.tfds_name}/CONFIG")
        raise ConfigError(f"{label} is not prepared in {data_dir} (no {dataset_dir}/<version>/dataset_info.json), "
                          "expected it prepared in array_record format (prepare never downloads)")
    version_dir = os.path.join(dataset_dir, max(versions, key=lambda v: tuple(map(int, v.split(".")))))

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
    return TfdsInput(version_dir, spec.split, spec.feature, f"{label} split {spec.split}", num_records)


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


def _check_text_column(kind: str, path: str, column: str) -> None:
    """ConfigError unless the file's schema has `column` as a string column (read from its footer or
    header only, so every file is checked before any is tokenized)."""
    try:
        if kind == "parquet":
            schema = pq.read_schema(path)
        else:
            with pa.memory_map(path) as source:
                schema = pa.ipc.open_stream(source).schema
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable {kind} file ({first_line(e)})") from None
    if column not in schema.names:
        raise ConfigError(f"{path}: no column {column!r}, expected one of {', '.join(schema.names[:12])} "
                          f"(name it as --input {kind}:PATH:COLUMN)")
    dtype = schema.field(column).type
    if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)):
        raise ConfigError(f"{path}: column {column!r} is {dtype}, expected a string column of text")


def _resolve(spec: InputSpec, tfds_data_dir: str | None) -> list[str] | TfdsInput:
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


def _jsonl_tasks(path: str, field: str) -> Iterator[tuple]:
    """Blocks of whole lines (about TASK_BYTES each) with the number of their first line."""
    line = 1
    with open(path, "rb") as f:
        while lines := f.readlines(TASK_BYTES):
            yield ("jsonl", path, line, b"".join(lines), field)
            line += len(lines)


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
            texts += ["" if t is None else t for t in values.to_pylist()]  # a null is a document without text
            size += int(pc.sum(pc.binary_length(values)).as_py() or 0)
            if size >= TASK_BYTES:
                yield ("texts", tuple(texts), size)
                first, texts, size = first + len(texts), [], 0
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: unreadable at row {first + len(texts)} ({first_line(e)})") from None
    if texts:
        yield ("texts", tuple(texts), size)


def tasks(resolved: list[tuple[InputSpec, list[str] | TfdsInput]]) -> Iterator[tuple]:
    """The units of work of resolved inputs, in order: about TASK_BYTES of text each."""
    for spec, target in resolved:
        if isinstance(target, TfdsInput):
            for start in range(0, target.num_records, TASK_TFDS_RECORDS):
                yield ("tfds", target, start, min(start + TASK_TFDS_RECORDS, target.num_records))
        elif spec.kind == "jsonl":
            for path in target:
                yield from _jsonl_tasks(path, spec.field)
        elif spec.kind in ("parquet", "arrow"):
            for path in target:
                yield from _arrow_tasks(spec.kind, path, spec.field)
        else:
            yield from _text_tasks(target)


def resolve_all(inputs: Sequence[str], tfds_data_dir: str | None) -> list[tuple[InputSpec, list[str] | TfdsInput]]:
    """Each spec parsed, with the files or the TFDS dataset it names. ConfigError for the first bad one."""
    if not inputs:
        raise ConfigError(f"--input: none given, expected at least one {SPEC_HELP}")
    # TFDS readers are not reused across runs: a dataset may have been prepared again in place.
    _tfds_source.cache_clear()
    return [(parsed, _resolve(parsed, tfds_data_dir)) for parsed in map(parse_input, inputs)]


def iter_documents(inputs: Sequence[str], skip_bad_records: bool = False,
                   tfds_data_dir: str | None = None) -> Iterator[str]:
    """The non-empty documents of `inputs` in order, as prepare reads them (for tokenizer training).
    The specs are checked before this returns; bad records raise ConfigError while iterating (or are
    skipped with `skip_bad_records`)."""
    resolved = resolve_all(inputs, tfds_data_dir)
    return (doc for task in tasks(resolved) for doc in read_task(task, BadRecords(skip_bad_records))[0] if doc)


class BadRecords:
    """Reports a bad record: raises ConfigError, or counts it when bad records are skipped."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise ConfigError(message)
        self.count += 1


def _read_jsonl(path: str, first_line: int, data: bytes, field: str, bad: BadRecords) -> tuple[list[str], int]:
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
            docs.append(value)
        except UnicodeEncodeError as e:
            # A JSON escape such as \ud800 decodes to a lone surrogate, which no tokenizer accepts.
            bad(f"{loc}: field {field!r} is not valid UTF-8 text (lone surrogate at character {e.start}), "
                "expected UTF-8 text (--skip_bad_records skips such lines)")
    return docs, size


def _read_text(paths: Sequence[str], bad: BadRecords) -> tuple[list[str], int]:
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
            size += len(data)
        except UnicodeDecodeError as e:
            bad(f"{path}: not valid UTF-8 (byte offset {e.start}), expected UTF-8 text "
                "(--skip_bad_records skips such files)")
    return docs, size


@functools.cache
def _tfds_source(version_dir: str, split: str) -> Any:
    """The split's TFDS data source, opened once per process (and per `resolve_all`)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(version_dir).as_data_source(split=split)


def _read_tfds(target: TfdsInput, start: int, stop: int, bad: BadRecords) -> tuple[list[str], int]:
    feature, label = target.feature, target.label
    records = _tfds_source(target.version_dir, target.split).__getitems__(list(range(start, stop)))
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
            size += len(value)
        except UnicodeDecodeError as e:
            bad(f"{label} record {index}: feature {feature!r} is not valid UTF-8 (byte {e.start}), expected "
                "UTF-8 text (--skip_bad_records skips such records)")
    return docs, size


def read_task(task: tuple, bad: BadRecords) -> tuple[list[str], int]:
    """(the documents of a task from `tasks`, their UTF-8 size in bytes)."""
    if task[0] == "texts":  # read from their columnar file when the task was made
        return list(task[1]), task[2]
    reader = {"jsonl": _read_jsonl, "text": _read_text, "tfds": _read_tfds}.get(task[0])
    if reader is None:
        raise ValueError(f"unknown task kind {task[0]!r}")
    return reader(*task[1:], bad=bad)
