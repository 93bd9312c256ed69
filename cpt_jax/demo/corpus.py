"""The demo's generated corpus, a pure function of the seed (the README's demo section says what it
measures): biographies of two disjoint populations, QA pairs about A, and the three multiple-choice
tasks (lm-eval-harness records plus name and attribute; the gold value among 3 distractors).

Each population's `val_bios` validation biographies are written at the end of its file, where
`prepare` takes the validation split from: validation loss measures the facts, never a document
that was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence
from typing import Any

FIRST_NAMES = (
    "Alma", "Bruno", "Cora", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lukas",
    "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Soren", "Tara", "Umar", "Vera", "Wanda", "Xavier",
    "Yara", "Zeno", "Anika", "Boris", "Celia", "Dario",
)
LAST_NAMES = (
    "Abbott", "Brenner", "Castillo", "Dunmore", "Eriksen", "Falk", "Garnier", "Holt", "Ivanova", "Jansen",
    "Kovac", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quiroga", "Rahman", "Sato", "Tanaka",
    "Ulrich", "Varga", "Weber", "Xu", "Young", "Zeller", "Adler", "Barros", "Conti", "Dahl",
)
CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Dublin", "Nairobi", "Quito", "Riga", "Kyoto", "Perth", "Turin")
PROFESSIONS = ("baker", "pilot", "surgeon", "carpenter", "violinist", "chemist", "lawyer", "farmer", "architect",
               "journalist", "geologist", "tailor")
YEARS = tuple(str(y) for y in range(1950, 2000, 4))  # 13 years
HOBBIES = ("chess", "sailing", "pottery", "archery", "gardening", "fencing", "knitting", "climbing", "painting",
           "fishing", "juggling", "origami")

ATTRIBUTES = ("city", "profession", "year", "hobby")
VOCABULARY = {"city": CITIES, "profession": PROFESSIONS, "year": YEARS, "hobby": HOBBIES}
CHOICES = 4  # per question: the gold value and 3 distractors

# Biography sentences: every template names the person and ends with the attribute's value, so the
# text before the value is a cloze prompt in the biographies' own phrasing.
BIO_TEMPLATES = {
    "city": ("{name} was born in {city}.", "{name} grew up in the city of {city}.",
             "The birthplace of {name} is {city}."),
    "profession": ("{name} works as a {profession}.", "By trade, {name} is a {profession}.",
                   "{name} earns a living as a {profession}."),
    "year": ("{name} was born in the year {year}.", "{name} came into the world in {year}.",
             "The birth year of {name} is {year}."),
    "hobby": ("In free time, {name} enjoys {hobby}.", "The favourite hobby of {name} is {hobby}.",
              "{name} spends weekends on {hobby}."),
}
QUESTION_TEMPLATES = {
    "city": "Q: Where was {name} born?",
    "profession": "Q: What is the profession of {name}?",
    "year": "Q: In what year was {name} born?",
    "hobby": "Q: What is the hobby of {name}?",
}
ANSWER = " A:"

SOURCES = ("A", "B", "qa")  # the prepared training sources
TASKS = ("retention", "acquisition", "heldout_qa")  # the accuracy groups, in report order


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    city: str
    profession: str
    year: str
    hobby: str

    def attribute(self, key: str) -> str:
        return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The generated texts and tasks: training biographies (a_bios, b_bios), validation biographies
    (a_val, b_val), the QA pairs about A (qa_train, the `qa` source) and {task name: its records}."""

    seed: int
    people_a: tuple[Person, ...]
    people_b: tuple[Person, ...]
    a_bios: tuple[str, ...]
    b_bios: tuple[str, ...]
    a_val: tuple[str, ...]
    b_val: tuple[str, ...]
    qa_train: tuple[str, ...]
    tasks: dict[str, tuple[dict[str, Any], ...]]

    def training_texts(self) -> list[str]:
        """Every text any run may train on (the sources A, B and qa without their validation docs)."""
        return [*self.a_bios, *self.b_bios, *self.qa_train]


def question(attribute: str, name: str) -> str:
    return QUESTION_TEMPLATES[attribute].format(name=name)


def biography(person: Person, rng: random.Random) -> str:
    """One biography: a sentence per attribute, each from a random template, in random order."""
    sentences = [rng.choice(BIO_TEMPLATES[key]).format(name=person.name, **{key: person.attribute(key)})
                 for key in ATTRIBUTES]
    rng.shuffle(sentences)
    return " ".join(sentences)


def cloze_context(template: str, attribute: str, name: str) -> str:
    """The text of a biography template before the attribute's value ("NAME was born in")."""
    head, sep, tail = template.partition("{" + attribute + "}")
    if not sep or tail != ".":
        raise ValueError(f"template {template!r}: expected it to end with {{{attribute}}}.")
    return head.format(name=name).rstrip()


def choice_record(context: str, attribute: str, person: Person, rng: random.Random) -> dict[str, Any]:
    """A multiple-choice record: the person's value of `attribute` among 3 others of its vocabulary."""
    gold_value = person.attribute(attribute)
    distractors = rng.sample([v for v in VOCABULARY[attribute] if v != gold_value], CHOICES - 1)
    gold = rng.randrange(CHOICES)
    return {"context": context, "choices": distractors[:gold] + [gold_value] + distractors[gold:], "gold": gold,
            "name": person.name, "attribute": attribute}


def cloze_task(people: Sequence[Person], rng: random.Random) -> tuple[dict[str, Any], ...]:
    """One cloze per fact of `people`, each in a random one of the biography phrasings."""
    return tuple(choice_record(cloze_context(rng.choice(BIO_TEMPLATES[key]), key, p.name), key, p, rng)
                 for p in people for key in ATTRIBUTES)


def question_task(people: Sequence[Person], rng: random.Random) -> tuple[dict[str, Any], ...]:
    """One question per fact of `people` in the QA format (the prompt ends with ' A:')."""
    return tuple(choice_record(question(key, p.name) + ANSWER, key, p, rng) for p in people for key in ATTRIBUTES)


def generate(seed: int = 0, *, people_a: int = 80, people_b: int = 80, bios_per_person: int = 3,
             val_bios: int = 16) -> Corpus:
    """The corpus for `seed`. Names are drawn without replacement, so A and B are disjoint."""
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if people_a + people_b > len(names):
        raise ValueError(f"people_a + people_b: {people_a + people_b}, expected at most {len(names)} names")
    if min(people_a, people_b, bios_per_person, val_bios) < 1:
        raise ValueError("expected at least one person per population, one biography per person and one "
                         "validation biography")
    rng = random.Random(seed)
    chosen = rng.sample(names, people_a + people_b)

    def person(name: str) -> Person:
        return Person(name, rng.choice(CITIES), rng.choice(PROFESSIONS), rng.choice(YEARS), rng.choice(HOBBIES))

    pop_a = tuple(person(n) for n in chosen[:people_a])
    pop_b = tuple(person(n) for n in chosen[people_a:])
    a_bios = tuple(biography(p, rng) for p in pop_a for _ in range(bios_per_person))
    b_bios = tuple(biography(p, rng) for p in pop_b for _ in range(bios_per_person))
    a_val = tuple(biography(pop_a[i % people_a], rng) for i in range(val_bios))
    b_val = tuple(biography(pop_b[i % people_b], rng) for i in range(val_bios))
    qa_train = [f"{question(key, p.name)}{ANSWER} {p.attribute(key)}" for p in pop_a for key in ATTRIBUTES]
    rng.shuffle(qa_train)
    tasks = {"retention": cloze_task(pop_a, rng), "acquisition": cloze_task(pop_b, rng),
             "heldout_qa": question_task(pop_b, rng)}
    return Corpus(seed, pop_a, pop_b, a_bios, b_bios, a_val, b_val, tuple(qa_train), tasks)


def _write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def source_documents(corpus: Corpus) -> dict[str, tuple[list[str], int]]:
    """{source: (its documents in file order, how many of the last ones are validation documents)}.
    A: A's biographies, shuffled, then A's validation biographies; B likewise; qa:
    the QA pairs (no validation documents: the questions the tasks ask are not in it)."""
    rng = random.Random(corpus.seed + 1)
    a_docs = list(corpus.a_bios)
    rng.shuffle(a_docs)
    b_docs = list(corpus.b_bios)
    rng.shuffle(b_docs)
    return {"A": (a_docs + list(corpus.a_val), len(corpus.a_val)),
            "B": (b_docs + list(corpus.b_val), len(corpus.b_val)),
            "qa": (list(corpus.qa_train), 0)}


def paths(directory: str) -> dict[str, str]:
    """{name: the JSONL file in `directory`} of every source and task `write` writes."""
    return {name: os.path.join(directory, f"{name}.jsonl") for name in (*SOURCES, *TASKS)}


def write(corpus: Corpus, directory: str) -> dict[str, str]:
    """Write every source as JSONL (field 'text') and every task file; returns `paths(directory)`."""
    os.makedirs(directory, exist_ok=True)
    files = paths(directory)
    for name, (docs, _) in source_documents(corpus).items():
        _write_jsonl(files[name], [{"text": t} for t in docs])
    for name, records in corpus.tasks.items():
        _write_jsonl(files[name], records)
    return files


def validation_examples(doc_tokens: Sequence[int], val_docs: int, example_length: int) -> int:
    """How many of the last examples `prepare` cuts from documents of these token counts (EOS
    included, in file order) lie wholly inside the last `val_docs` documents: the `val_examples`
    that hold out only validation documents. prepare drops the trailing partial example."""
    total = sum(doc_tokens)
    val = sum(doc_tokens[len(doc_tokens) - val_docs:]) if val_docs else 0
    return max(0, (val - total % example_length) // example_length)
