"""Multiple-choice tasks in the lm-eval-harness style: loading, prompt formatting, converters.

A task file is JSONL, one question per line (blank lines are skipped):

    {"context": "The capital of France is", "choices": ["Paris", "Rome", "Oslo"], "gold": 0}

with at least two non-empty choices and `gold` the index of the right one. The prompt of a
question (`Task.prompt`) is the template (one `{context}` placeholder, e.g.
"Question: {context}\\nAnswer:"; default: the context as is) applied to its context, after k
few-shot examples, each its templated context and gold choice, separated by a blank line. The shots
are the same for every question: k records drawn with `random.Random(seed)` from a separate
few-shot file, or, without one, the first k records of the task file in a seeded order (those are
not scored). A choice follows its prompt after a space unless the prompt ends with whitespace or
the choice starts with it (the converters write choices with their leading space).

`python -m cpt_jax.tasks convert` writes task files from MMLU's CSVs (the prompt of
lm-eval-harness's mmlu tasks without the per-subject header; convert the dev split into a few-shot
file) and HellaSwag's JSONL (context and cleanup as the harness builds them; the unlabeled test
split cannot be converted). Every problem with a file is a ConfigError of one line naming
file:line, what was found and what is expected. No JAX here: the converter starts fast.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import random
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cpt_jax import cli
from cpt_jax.config import ConfigError

FEWSHOT_DELIMITER = "\n\n"
CHOICE_DELIMITER = " "
DEFAULT_TEMPLATE = "{context}"
RECORD_HELP = 'one JSON object per line like {"context": "...", "choices": ["...", "..."], "gold": 0}'


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: its context, choices, the index of the right choice, and where it came from."""

    context: str
    choices: tuple[str, ...]
    gold: int
    line: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
    """A loaded task named `name` (the file's stem unless given) from the file `path`: the
    questions to score (`examples`) and how to turn them into prompts (the few-shot `shots`, empty
    for zero-shot, and a `template` with one `{context}` placeholder)."""

    name: str
    path: str
    examples: tuple[Example, ...]
    shots: tuple[Example, ...] = ()
    template: str = DEFAULT_TEMPLATE

    def prompt(self, example: Example) -> str:
        """The text every choice of `example` is conditioned on: the shots (each its templated
        context and gold choice, then a blank line), then the example's templated context."""
        prefix = ""
        for shot in self.shots:
            context = self.template.replace("{context}", shot.context)
            prefix += context + continuation(context, shot.choices[shot.gold]) + FEWSHOT_DELIMITER
        return prefix + self.template.replace("{context}", example.context)

    def requests(self) -> list[tuple[str, list[str]]]:
        """(prompt, [continuation of each choice]) of every scored question, in file order."""
        prompts = [self.prompt(ex) for ex in self.examples]
        return [(p, [continuation(p, c) for c in ex.choices]) for p, ex in zip(prompts, self.examples, strict=True)]


def continuation(prompt: str, choice: str) -> str:
    """The text scored for `choice` after `prompt`: the choice, after a space unless the prompt
    ends with whitespace or the choice starts with whitespace."""
    if not prompt or prompt[-1].isspace() or choice[:1].isspace():
        return choice
    return CHOICE_DELIMITER + choice


def _check_file(path: str, what: str) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file, expected {what}")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not a file, expected {what}")
    return path


def _lines(path: str):
    """(line number, text) of every non-blank line of a UTF-8 file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{number}: not valid UTF-8 (byte {e.start} of the line), expected UTF-8 "
                                  "text") from None
            if text.strip():
                yield number, text


def parse_record(obj: Any, where: str, line: int = 0) -> Example:
    """An Example from a decoded JSON value; ConfigError naming `where` (file:line) otherwise."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: a JSON {type(obj).__name__}, expected {RECORD_HELP}")
    for key in ("context", "choices", "gold"):
        if key not in obj:
            raise ConfigError(f"{where}: no key {key!r}, expected the keys context, choices and gold")
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str):
        raise ConfigError(f"{where}: context is a JSON {type(context).__name__}, expected a string")
    if not isinstance(choices, list):
        raise ConfigError(f"{where}: choices is a JSON {type(choices).__name__}, expected a list of strings")
    if len(choices) < 2:
        raise ConfigError(f"{where}: {len(choices)} choice{'s' if len(choices) != 1 else ''}, expected at least 2")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise ConfigError(f"{where}: choices[{i}] is a JSON {type(choice).__name__}, expected a string")
        if not choice:
            raise ConfigError(f"{where}: choices[{i}] is empty, expected a non-empty string")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise ConfigError(f"{where}: gold is {gold!r}, expected the integer index of the right choice")
    if not 0 <= gold < len(choices):
        raise ConfigError(f"{where}: gold {gold} is out of range, expected an index into the {len(choices)} "
                          f"choices (0..{len(choices) - 1})")
    return Example(context, tuple(choices), gold, line)


def read_records(path: str | os.PathLike) -> list[Example]:
    """Every question of a task file; ConfigError (file:line) for the first bad line."""
    path = _check_file(os.fspath(path), f"a task file ({RECORD_HELP})")
    examples = []
    for number, text in _lines(path):
        where = f"{path}:{number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno}), "
                              f"expected {RECORD_HELP}") from None
        examples.append(parse_record(obj, where, number))
    if not examples:
        raise ConfigError(f"{path}: no records, expected {RECORD_HELP}")
    return examples


def load_task(path: str | os.PathLike, *, fewshot: int = 0, fewshot_path: str | os.PathLike | None = None,
              template: str | None = None, seed: int = 0, name: str | None = None) -> Task:
    """Load a task file with `fewshot` shots (see the module docstring) and a prompt template.

    Raises ConfigError for a missing or bad file, a template without `{context}`, or more shots
    than the few-shot pool holds (without a few-shot file, at least one question must remain).
    """
    records = read_records(path)
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    template = DEFAULT_TEMPLATE if template is None else template
    if not isinstance(template, str) or "{context}" not in template:
        raise ConfigError(f"template: {template!r}, expected a string with a {{context}} placeholder, e.g. "
                          "'Question: {context}\\nAnswer:'")
    if isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0:
        raise ConfigError(f"fewshot: {fewshot!r}, expected an integer >= 0 (the number of examples in the prompt)")
    if fewshot_path is not None and str(fewshot_path):
        pool = read_records(fewshot_path)
        if fewshot > len(pool):
            raise ConfigError(f"{os.path.abspath(fewshot_path)}: {len(pool)} records, expected at least fewshot = "
                              f"{fewshot}")
        scored = records
    else:
        if fewshot >= len(records):
            raise ConfigError(f"{path}: {len(records)} records, expected more than fewshot = {fewshot} (the first "
                              f"{fewshot} are the shots and are not scored); or give a few-shot file")
        pool, scored = records[:fewshot], records[fewshot:]
    shots = random.Random(seed).sample(pool, fewshot) if fewshot else []
    name = name or os.path.splitext(os.path.basename(path))[0]
    return Task(name, path, tuple(scored), tuple(shots), template)


_SPEC_KEYS = ("path", "fewshot", "fewshot_path", "template", "seed")


def task_from_spec(name: str, spec: Any, key: str = "eval.tasks") -> Task:
    """A Task from a config value: a path, or a mapping with `path` and optional fewshot,
    fewshot_path, template and seed (the arguments of `load_task`); or a Task (returned renamed)."""
    if isinstance(spec, Task):
        return dataclasses.replace(spec, name=name)
    if isinstance(spec, (str, os.PathLike)):
        return load_task(spec, name=name)
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}.{name}: {spec!r}, expected a task file path or a dict with keys "
                          f"{', '.join(_SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{name}: unknown key {unknown[0]!r}, expected keys among {', '.join(_SPEC_KEYS)}")
    if not spec.get("path"):
        raise ConfigError(f"{key}.{name}: no path, expected the task file under 'path'")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{key}.{name}.seed: {seed!r}, expected an integer")
    return load_task(spec["path"], fewshot=spec.get("fewshot", 0), fewshot_path=spec.get("fewshot_path"),
                     template=spec.get("template"), seed=seed, name=name)


LETTERS = ("A", "B", "C", "D")


def _expand(inputs: Sequence[str], pattern: str, what: str) -> list[str]:
    """Input files: each given file, and the files matching `pattern` in each given directory."""
    paths = []
    for item in inputs:
        item = os.path.abspath(os.path.expanduser(os.fspath(item)))
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, pattern)))
            if not found:
                raise ConfigError(f"--input {item}: a directory without {pattern} files, expected {what}")
            paths.extend(found)
        else:
            paths.append(_check_file(item, what))
    if not paths:
        raise ConfigError(f"--input: missing, expected {what}")
    return paths


def mmlu_record(row: Sequence[str], where: str) -> dict[str, Any]:
    """One MMLU CSV row (question, A, B, C, D, answer letter) as a task record."""
    if len(row) != 6:
        raise ConfigError(f"{where}: {len(row)} columns, expected 6 (question, A, B, C, D, answer letter)")
    question, *options, answer = row
    letter = answer.strip().upper()
    if letter not in LETTERS:
        raise ConfigError(f"{where}: answer {answer!r}, expected one of A, B, C, D")
    lines = [question.strip()] + [f"{x}. {opt}" for x, opt in zip(LETTERS, options, strict=True)] + ["Answer:"]
    return {"context": "\n".join(lines), "choices": [f" {x}" for x in LETTERS], "gold": LETTERS.index(letter)}


def convert_mmlu(inputs: Sequence[str]) -> list[dict[str, Any]]:
    """Task records from MMLU CSV files (or directories of them), in file and row order."""
    records = []
    for path in _expand(inputs, "*.csv", "MMLU CSV files (question,A,B,C,D,answer; no header)"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            start = 1
            try:
                for row in reader:
                    if any(cell.strip() for cell in row):
                        records.append(mmlu_record(row, f"{path}:{start}"))
                    start = reader.line_num + 1
            except csv.Error as e:
                raise ConfigError(f"{path}:{reader.line_num}: not valid CSV ({e}), expected MMLU rows") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start}), expected UTF-8 CSV") from None
    return records


def _harness_clean(text: str) -> str:
    """lm-eval-harness's HellaSwag cleanup (WikiHow's ' [title]' marks and other [..] artifacts),
    then stripped (the harness leaves a space where a leading [header] was)."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ").strip()


def hellaswag_record(obj: Any, where: str) -> dict[str, Any]:
    """One HellaSwag JSON object as a task record: context ctx_a + " " + ctx_b capitalized (`ctx`
    without ctx_a), choices the endings after a space, gold the label."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: a JSON {type(obj).__name__}, expected a HellaSwag object (ctx, endings, label)")
    if "ctx_a" in obj:
        ctx_a, ctx_b = obj["ctx_a"], obj.get("ctx_b", "")
        if not isinstance(ctx_a, str) or not isinstance(ctx_b, str):
            raise ConfigError(f"{where}: ctx_a/ctx_b are not strings, expected the HellaSwag context strings")
        context = ctx_a + " " + ctx_b.capitalize()
    elif "ctx" in obj:
        context = obj["ctx"]
        if not isinstance(context, str):
            raise ConfigError(f"{where}: ctx is a JSON {type(context).__name__}, expected a string")
    else:
        raise ConfigError(f"{where}: no key 'ctx' (or 'ctx_a'), expected a HellaSwag object (ctx, endings, label)")
    endings = obj.get("endings")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise ConfigError(f"{where}: endings is {endings!r:.60}, expected a list of strings")
    if len(endings) < 2:
        raise ConfigError(f"{where}: {len(endings)} endings, expected at least 2")
    label = obj.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if label is None or label == "":
        raise ConfigError(f"{where}: no label (HellaSwag's test split is unlabeled), expected the index of the "
                          "right ending; convert the validation split")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ConfigError(f"{where}: label {label!r}, expected an index into the {len(endings)} endings")
    choices = [" " + _harness_clean(e) for e in endings]
    for i, choice in enumerate(choices):
        if not choice.strip():
            raise ConfigError(f"{where}: endings[{i}] is empty after cleaning, expected text")
    return {"context": _harness_clean(context), "choices": choices, "gold": label}


def convert_hellaswag(inputs: Sequence[str]) -> list[dict[str, Any]]:
    """Task records from HellaSwag JSONL files (or directories of *.jsonl), in file and line order."""
    records = []
    for path in _expand(inputs, "*.jsonl", "HellaSwag JSONL files"):
        for number, text in _lines(path):
            where = f"{path}:{number}"
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}), expected a HellaSwag "
                                  "object per line") from None
            records.append(hellaswag_record(obj, where))
    return records


CONVERTERS = {"mmlu": convert_mmlu, "hellaswag": convert_hellaswag}


def convert(fmt: str, inputs: Sequence[str], out: str | os.PathLike) -> int:
    """Convert `inputs` of format `fmt` ('mmlu' or 'hellaswag') to a new task file `out` (JSONL,
    written atomically); returns the count."""
    if fmt not in CONVERTERS:
        raise ConfigError(f"--format: {fmt!r}, expected one of {', '.join(CONVERTERS)}")
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if os.path.exists(out):
        raise ConfigError(f"--out {out}: already exists, expected a new path (delete it or choose another)")
    records = CONVERTERS[fmt](inputs)
    if not records:
        raise ConfigError("--input: no records found, expected at least one question")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(records)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m cpt_jax.tasks`."""
    p = argparse.ArgumentParser(prog="python -m cpt_jax.tasks",
                                description="Multiple-choice task files: convert public benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert MMLU CSV or HellaSwag JSONL into a task file",
                       description="Write {context, choices, gold} JSONL from MMLU CSV files or HellaSwag JSONL.")
    c.add_argument("--format", required=True, choices=sorted(CONVERTERS), help="the input's format")
    c.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="an input file or a directory of them (repeatable)")
    c.add_argument("--out", required=True, help="the task file to write (must not exist)")
    return p


@cli.reports_config_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    n = convert(args.format, args.input, args.out)
    print(f"wrote {n} questions to {os.path.abspath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
