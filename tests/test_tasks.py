"""Multiple-choice task files: loading, prompts, few-shot selection, the MMLU and HellaSwag
converters, the convert command, and every kind of bad input (one line naming file:line)."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from cpt_jax import tasks
from cpt_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rec(context, choices, gold):
    return json.dumps({"context": context, "choices": choices, "gold": gold})


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def questions(n, prefix="q"):
    return [rec(f"{prefix}{i}", [f"right{i}", f"wrong{i}"], 0) for i in range(n)]


def test_load_and_format(tmp_path):
    path = write(tmp_path / "yesno.jsonl", [
        rec("Is the sky blue?", ["yes", "no"], 0),
        "",
        rec("Is fire cold?", [" yes", " no"], 1),
        rec("Pick one", ["a", "b", "c"], 2),
    ])
    task = tasks.load_task(path, template="Question: {context}\nAnswer:")
    assert task.name == "yesno" and task.path == path and task.shots == ()
    assert [ex.line for ex in task.examples] == [1, 3, 4]
    assert task.examples[1] == tasks.Example("Is fire cold?", (" yes", " no"), 1, 3)
    assert task.requests() == [
        ("Question: Is the sky blue?\nAnswer:", [" yes", " no"]),  # a space is put before the choice
        ("Question: Is fire cold?\nAnswer:", [" yes", " no"]),  # ... unless the choice has one
        ("Question: Pick one\nAnswer:", [" a", " b", " c"]),
    ]
    # Default template: the context as is; a template ending in whitespace takes the choice as is.
    assert tasks.load_task(path).requests()[0] == ("Is the sky blue?", [" yes", " no"])
    assert tasks.load_task(path, template="{context}\n").requests()[0] == ("Is the sky blue?\n", ["yes", "no"])


def test_continuation_rule():
    assert tasks.continuation("Answer:", "B") == " B"
    assert tasks.continuation("Answer:", " B") == " B"
    assert tasks.continuation("Answer: ", "B") == "B"
    assert tasks.continuation("Answer:\n", "B") == "B"
    assert tasks.continuation("", "B") == "B"


def test_fewshot_from_the_first_records(tmp_path):
    path = write(tmp_path / "t.jsonl", questions(6))
    task = tasks.load_task(path, fewshot=2, template="Q: {context}\nA:", seed=0)
    assert [ex.context for ex in task.examples] == ["q2", "q3", "q4", "q5"]  # the shots are not scored
    assert sorted(ex.context for ex in task.shots) == ["q0", "q1"]
    first, second = task.shots
    assert task.prompt(task.examples[0]) == (
        f"Q: {first.context}\nA: right{first.context[1:]}\n\nQ: {second.context}\nA: right{second.context[1:]}"
        "\n\nQ: q2\nA:")
    assert task.requests()[0] == (task.prompt(task.examples[0]), [" right2", " wrong2"])
    # Deterministic in the seed; the seed orders the shots.
    assert tasks.load_task(path, fewshot=2, seed=0) == tasks.load_task(path, fewshot=2, seed=0)
    orders = {tuple(ex.context for ex in tasks.load_task(path, fewshot=2, seed=s).shots) for s in range(10)}
    assert orders == {("q0", "q1"), ("q1", "q0")}


def test_fewshot_from_a_separate_file(tmp_path):
    path = write(tmp_path / "t.jsonl", questions(3))
    pool = write(tmp_path / "dev.jsonl", questions(8, prefix="dev"))
    task = tasks.load_task(path, fewshot=3, fewshot_path=pool, seed=7)
    assert [ex.context for ex in task.examples] == ["q0", "q1", "q2"]  # every record is scored
    assert len(task.shots) == 3 and all(ex.context.startswith("dev") for ex in task.shots)
    assert len(set(task.shots)) == 3
    assert task == tasks.load_task(path, fewshot=3, fewshot_path=pool, seed=7)
    picks = {tuple(ex.context for ex in tasks.load_task(path, fewshot=3, fewshot_path=pool, seed=s).shots)
             for s in range(5)}
    assert len(picks) > 1
    assert task.prompt(task.examples[0]).count("\n\n") == 3
    assert tasks.load_task(path, fewshot_path=pool).shots == ()  # fewshot 0: no shots


def test_task_from_spec(tmp_path):
    path = write(tmp_path / "t.jsonl", questions(4))
    assert tasks.task_from_spec("mine", path).name == "mine"
    spec = ml_collections.ConfigDict({"path": path, "fewshot": 1, "template": "Q: {context}", "seed": 3})
    task = tasks.task_from_spec("mine", spec)
    assert task.name == "mine" and len(task.examples) == 3 and len(task.shots) == 1
    assert task.template == "Q: {context}"
    assert tasks.task_from_spec("other", task).name == "other"
    with pytest.raises(ConfigError, match=r"eval.tasks.mine: unknown key 'shots'"):
        tasks.task_from_spec("mine", {"path": path, "shots": 1})
    with pytest.raises(ConfigError, match=r"eval.tasks.mine: no path"):
        tasks.task_from_spec("mine", {"fewshot": 1})
    with pytest.raises(ConfigError, match=r"eval.tasks.mine.seed: 'x', expected an integer"):
        tasks.task_from_spec("mine", {"path": path, "seed": "x"})
    with pytest.raises(ConfigError, match=r"eval.tasks.mine: 5, expected a task file path or a dict"):
        tasks.task_from_spec("mine", 5)


GOOD = rec("ok", ["a", "b"], 0)


@pytest.mark.parametrize("line, message", [
    ("not json", r"not valid JSON \(Expecting value at column 1\)"),
    ('{"context": "x", "choices": ["a", "b"], "gold": 0', r"not valid JSON"),
    ("[1, 2]", r"a JSON list, expected one JSON object per line"),
    (json.dumps({"choices": ["a", "b"], "gold": 0}), r"no key 'context'"),
    (json.dumps({"context": "x", "gold": 0}), r"no key 'choices'"),
    (json.dumps({"context": "x", "choices": ["a", "b"]}), r"no key 'gold'"),
    (rec(5, ["a", "b"], 0), r"context is a JSON int, expected a string"),
    (rec("x", "ab", 0), r"choices is a JSON str, expected a list of strings"),
    (rec("x", ["a"], 0), r"1 choice, expected at least 2"),
    (rec("x", [], 0), r"0 choices, expected at least 2"),
    (rec("x", ["a", 3], 0), r"choices\[1\] is a JSON int, expected a string"),
    (rec("x", ["a", ""], 0), r"choices\[1\] is empty, expected a non-empty string"),
    (rec("x", ["a", "b"], 2), r"gold 2 is out of range, expected an index into the 2 choices \(0\.\.1\)"),
    (rec("x", ["a", "b"], -1), r"gold -1 is out of range"),
    (rec("x", ["a", "b"], "0"), r"gold is '0', expected the integer index"),
    (rec("x", ["a", "b"], True), r"gold is True, expected the integer index"),
    (rec("x", ["a", "b"], 1.0), r"gold is 1.0, expected the integer index"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(ConfigError) as e:
        tasks.load_task(path)
    text = str(e.value)
    assert text.startswith(f"{path}:2: ") and "\n" not in text, text
    assert re.search(message, text), text


def test_bad_files(tmp_path):
    good = write(tmp_path / "good.jsonl", questions(3))
    with pytest.raises(ConfigError, match=r"missing.jsonl: no such file, expected a task file"):
        tasks.load_task(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r": not a file, expected a task file"):
        tasks.load_task(tmp_path)
    empty = write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match=r"empty.jsonl: no records"):
        tasks.load_task(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(GOOD.encode() + b'\n{"context": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(ConfigError, match=r"latin.jsonl:2: not valid UTF-8"):
        tasks.load_task(latin)
    with pytest.raises(ConfigError, match=r"template: 'Question:', expected a string with a \{context\}"):
        tasks.load_task(good, template="Question:")
    with pytest.raises(ConfigError, match=r"good.jsonl: 3 records, expected more than fewshot = 3"):
        tasks.load_task(good, fewshot=3)
    with pytest.raises(ConfigError, match=r"fewshot: -1, expected an integer >= 0"):
        tasks.load_task(good, fewshot=-1)
    with pytest.raises(ConfigError, match=r"good.jsonl: 3 records, expected at least fewshot = 4"):
        tasks.load_task(good, fewshot=4, fewshot_path=good)
    with pytest.raises(ConfigError, match=r"dev.jsonl: no such file"):
        tasks.load_task(good, fewshot=1, fewshot_path=tmp_path / "dev.jsonl")


# ------------------------------------------------------------------------------------ converters

MMLU_CSV = (
    'What is 2+2?,3,4,5,6,B\n'
    '"Which one, with a comma?","a ""quoted"" one",b,c,d,d\n'
    '"A question\non two lines",w,x,y,z,A\n'
    '  Padded question  ,1,2,3,4, C \n'
)


def test_mmlu_converter(tmp_path):
    path = tmp_path / "math_test.csv"
    path.write_text(MMLU_CSV, encoding="utf-8")
    records = tasks.convert_mmlu([str(path)])
    letters = [" A", " B", " C", " D"]
    assert records == [
        {"context": "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", "choices": letters, "gold": 1},
        {"context": 'Which one, with a comma?\nA. a "quoted" one\nB. b\nC. c\nD. d\nAnswer:', "choices": letters,
         "gold": 3},
        {"context": "A question\non two lines\nA. w\nB. x\nC. y\nD. z\nAnswer:", "choices": letters, "gold": 0},
        {"context": "Padded question\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", "choices": letters, "gold": 2},
    ]
    # A directory converts its CSV files in name order.
    d = tmp_path / "test"
    d.mkdir()
    (d / "b_test.csv").write_text("Q2,a,b,c,d,D\n", encoding="utf-8")
    (d / "a_test.csv").write_text("Q1,a,b,c,d,A\n", encoding="utf-8")
    (d / "notes.txt").write_text("not a csv", encoding="utf-8")
    assert [r["context"].split("\n")[0] for r in tasks.convert_mmlu([str(d)])] == ["Q1", "Q2"]
    # The converted file is a valid task whose prompt puts the letter after "Answer:".
    out = tmp_path / "mmlu.jsonl"
    assert tasks.convert("mmlu", [str(path)], out) == 4
    task = tasks.load_task(out)
    assert [ex.gold for ex in task.examples] == [1, 3, 0, 2]
    assert task.requests()[0][1] == [" A", " B", " C", " D"]


@pytest.mark.parametrize("content, message", [
    ("Q,a,b,c,d,A\nQ,a,b,c,D\n", r"bad_test.csv:2: 5 columns, expected 6"),
    ("Q,a,b,c,d,E\n", r"bad_test.csv:1: answer 'E', expected one of A, B, C, D"),
    ('"two\nlines",a,b,c,d,A\nQ,a,b,c,d,7\n', r"bad_test.csv:3: answer '7'"),
])
def test_mmlu_bad_rows(tmp_path, content, message):
    path = tmp_path / "bad_test.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        tasks.convert_mmlu([str(path)])


HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
     "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
     "endings": [", the man continues removing the snow.", "the man sleeps.", "a woman walks by.", "it rains."],
     "source_id": "x", "split": "val", "split_type": "indomain", "label": 3},
    {"ctx": "[header] How to boil water. [title] Fill a pot.", "endings": ["[step] Heat it.", "Drink it."],
     "label": "0"},
]


def test_hellaswag_converter(tmp_path):
    path = write(tmp_path / "hellaswag_val.jsonl", [json.dumps(r) for r in HELLASWAG])
    records = tasks.convert_hellaswag([path])
    assert records[0] == {
        "context": "Then, the man writes over the snow. Then",  # ctx_a + " " + ctx_b capitalized
        "choices": [" , the man continues removing the snow.", " the man sleeps.", " a woman walks by.", " it rains."],
        "gold": 3,
    }
    # Without ctx_a: ctx; WikiHow's [header]/[title]/[step] marks are cleaned as lm-eval-harness does.
    assert records[1] == {"context": "How to boil water.. Fill a pot.", "choices": [" Heat it.", " Drink it."],
                          "gold": 0}
    out = tmp_path / "hs.jsonl"
    assert tasks.convert("hellaswag", [path], out) == 2
    task = tasks.load_task(out)
    assert task.requests()[0] == ("Then, the man writes over the snow. Then", records[0]["choices"])


@pytest.mark.parametrize("obj, message", [
    ({"ctx": "c", "endings": ["a", "b"], "label": ""}, r":2: no label \(HellaSwag's test split is unlabeled\)"),
    ({"ctx": "c", "endings": ["a", "b"]}, r":2: no label"),
    ({"ctx": "c", "endings": ["a", "b"], "label": 2}, r":2: label 2, expected an index into the 2 endings"),
    ({"ctx": "c", "endings": ["a"], "label": 0}, r":2: 1 endings, expected at least 2"),
    ({"ctx": "c", "endings": "ab", "label": 0}, r":2: endings is 'ab', expected a list of strings"),
    ({"endings": ["a", "b"], "label": 0}, r":2: no key 'ctx' \(or 'ctx_a'\)"),
    ({"ctx": 3, "endings": ["a", "b"], "label": 0}, r":2: ctx is a JSON int"),
    ({"ctx": "c", "endings": ["a", "[x]"], "label": 0}, r":2: endings\[1\] is empty after cleaning"),
    ([1], r":2: a JSON list, expected a HellaSwag object"),
])
def test_hellaswag_bad_records(tmp_path, obj, message):
    path = write(tmp_path / "hs.jsonl", [json.dumps(HELLASWAG[1]), json.dumps(obj)])
    with pytest.raises(ConfigError, match=message):
        tasks.convert_hellaswag([path])
    bad_json = write(tmp_path / "hs2.jsonl", [json.dumps(HELLASWAG[1]), "{oops"])
    with pytest.raises(ConfigError, match=r"hs2.jsonl:2: not valid JSON"):
        tasks.convert_hellaswag([bad_json])


def test_convert_command(tmp_path, capsys):
    csv_path = tmp_path / "x_test.csv"
    csv_path.write_text(MMLU_CSV, encoding="utf-8")
    out = tmp_path / "out" / "mmlu.jsonl"
    assert tasks.main(["convert", "--format", "mmlu", "--input", str(csv_path), "--out", str(out)]) == 0
    assert "wrote 4 questions" in capsys.readouterr().err
    assert len(tasks.load_task(out).examples) == 4
    # User errors: one line, exit status 2, nothing written.
    for args, message in [
        (["--format", "mmlu", "--input", str(csv_path), "--out", str(out)], "error: --out "),
        (["--format", "mmlu", "--input", str(tmp_path / "none.csv"), "--out", str(tmp_path / "n.jsonl")],
         "none.csv: no such file"),
        (["--format", "hellaswag", "--input", str(csv_path), "--out", str(tmp_path / "h.jsonl")],
         "x_test.csv:1: not valid JSON"),
        (["--format", "mmlu", "--input", str(tmp_path / "out"), "--out", str(tmp_path / "d.jsonl")],
         "a directory without *.csv files"),
    ]:
        assert tasks.main(["convert", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["out", "x_test.csv"]
    with pytest.raises(SystemExit) as e:
        tasks.main(["convert", "--format", "arc", "--input", str(csv_path), "--out", str(tmp_path / "a.jsonl")])
    assert e.value.code == 2


def test_convert_command_as_a_module(tmp_path):
    path = write(tmp_path / "hellaswag_val.jsonl", [json.dumps(r) for r in HELLASWAG])
    out = tmp_path / "hs.jsonl"
    proc = subprocess.run([sys.executable, "-m", "cpt_jax.tasks", "convert", "--format", "hellaswag", "--input",
                           path, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["gold"] for line in out.read_text().splitlines()] == [3, 0]
    proc = subprocess.run([sys.executable, "-m", "cpt_jax.tasks", "convert", "--format", "hellaswag", "--input",
                           path, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out ") and "Traceback" not in proc.stderr
