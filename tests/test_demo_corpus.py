"""The demo's generated corpus: disjoint populations, tasks that ask what the texts state, questions
never asked in training, validation documents never trained on, determinism."""

import json
import re

from cpt_jax.demo import corpus as corpus_lib


def _person(c, name):
    return next(p for p in (*c.people_a, *c.people_b) if p.name == name)


def test_populations_and_task_sizes():
    c = corpus_lib.generate(7, people_a=20, people_b=15, bios_per_person=4, val_bios=5)
    names_a, names_b = {p.name for p in c.people_a}, {p.name for p in c.people_b}
    assert not names_a & names_b and len(names_a) == 20 and len(names_b) == 15
    assert len(c.a_bios) == 80 and len(c.b_bios) == 60 and len(c.a_val) == len(c.b_val) == 5
    assert len(c.qa_train) == 4 * 20 and all(re.fullmatch(r"Q: .+\? A: \S+", qa) for qa in c.qa_train)
    sizes = {name: len(records) for name, records in c.tasks.items()}
    assert sizes == {"retention": 80, "acquisition": 60, "heldout_qa": 60}
    assert {r["name"] for r in c.tasks["retention"]} == names_a
    assert {r["name"] for r in c.tasks["acquisition"]} == {r["name"] for r in c.tasks["heldout_qa"]} == names_b


def test_every_question_asks_a_fact_the_texts_state():
    c = corpus_lib.generate(3, people_a=20, people_b=15, val_bios=5)
    training = "\n".join(c.training_texts())
    for task, records in c.tasks.items():
        bios = c.a_bios if task == "retention" else c.b_bios
        for r in records:
            person = _person(c, r["name"])
            value = person.attribute(r["attribute"])
            assert r["choices"][r["gold"]] == value
            assert len(set(r["choices"])) == corpus_lib.CHOICES
            assert set(r["choices"]) <= set(corpus_lib.VOCABULARY[r["attribute"]])
            if task == "heldout_qa":
                # Asked in the QA format, never asked (nor answered) in training.
                assert r["context"].endswith("? A:") and r["context"].removesuffix(" A:") not in training
                assert not any(person.name in qa for qa in c.qa_train)
            else:
                # A cloze in one of the biographies' phrasings, cut before the value; the person's
                # biographies state the value.
                phrasings = [t.format(name=person.name, **{r["attribute"]: value})
                             for t in corpus_lib.BIO_TEMPLATES[r["attribute"]]]
                assert f"{r['context']} {value}." in phrasings
                assert all(any(p in bio for p in phrasings) for bio in bios if person.name in bio)
    assert not any("Q:" in t for t in (*c.a_bios, *c.b_bios))


def test_validation_documents_are_never_trained_on():
    c = corpus_lib.generate(5, people_a=30, people_b=30, val_bios=10)
    training = set(c.training_texts())
    assert not training & set(c.a_val) and not training & set(c.b_val)
    docs = corpus_lib.source_documents(c)
    for name, val in (("A", c.a_val), ("B", c.b_val)):
        files, n_val = docs[name]
        assert n_val == len(val) and tuple(files[-n_val:]) == val
    assert docs["qa"] == (list(c.qa_train), 0)


def test_validation_examples_hold_out_only_validation_documents():
    length = 10
    # 3 training documents of 12 tokens, then 2 validation documents of 9: 54 tokens, 5 examples and
    # 4 dropped; the validation documents are the last 18 tokens, of which 14 are in examples.
    assert corpus_lib.validation_examples([12, 12, 12, 9, 9], 2, length) == 1
    assert corpus_lib.validation_examples([10] * 6, 2, length) == 2
    assert corpus_lib.validation_examples([10] * 6, 0, length) == 0
    assert corpus_lib.validation_examples([30, 3], 1, length) == 0


def test_the_corpus_is_a_function_of_the_seed(tmp_path):
    a = corpus_lib.generate(3, people_a=30, people_b=20, val_bios=5)
    assert a == corpus_lib.generate(3, people_a=30, people_b=20, val_bios=5)
    assert a != corpus_lib.generate(4, people_a=30, people_b=20, val_bios=5)
    one = corpus_lib.write(a, str(tmp_path / "one"))
    two = corpus_lib.write(corpus_lib.generate(3, people_a=30, people_b=20, val_bios=5), str(tmp_path / "two"))
    assert set(one) == {*corpus_lib.SOURCES, *corpus_lib.TASKS}
    for name in one:
        assert open(one[name], "rb").read() == open(two[name], "rb").read()
    records = [json.loads(line) for line in open(one["retention"])]
    assert records == [dict(r) for r in a.tasks["retention"]]


def test_acquisition_and_heldout_qa_ask_about_the_same_facts():
    c = corpus_lib.generate(4, people_a=6, people_b=7, val_bios=2)
    facts = {t: [(r["name"], r["attribute"]) for r in c.tasks[t]] for t in corpus_lib.TASKS}
    assert facts["acquisition"] == facts["heldout_qa"] and len(set(facts["acquisition"])) == 4 * 7
    assert not {n for n, _ in facts["retention"]} & {n for n, _ in facts["acquisition"]}
