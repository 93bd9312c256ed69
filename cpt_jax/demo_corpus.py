"""The demo's generated corpus: synthetic biographies of two disjoint populations, filler text, and
question-answer pairs about the second population, with held-out questions for evaluation.

- Population A ("pretraining"): biographies, mixed with general filler text.
- Population B (the new domain): biographies of other people (no name is in both populations).
- QA about B: "Q: What is the profession of NAME? A: PROFESSION", one question per attribute.
  The people of B are split: the QA of the held-out people is never trained on; it becomes a
  multiple-choice task (the gold attribute and 3 distractors from the same vocabulary). Their
  facts are only in their biographies, so a right answer is knowledge carried from the bios.

Everything is a pure function of the seed (`random.Random(seed)`, no global state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
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

# Biography sentences: every template names the person and one attribute.
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

FILLER_SUBJECTS = ("The river", "A small dog", "The old bridge", "Our neighbour", "The morning train", "A red kite",
                   "The market", "The library", "A quiet street", "The tall tower", "The wind", "An orange cat")
FILLER_VERBS = ("crosses", "watches", "follows", "greets", "passes", "circles", "reaches", "leaves")
FILLER_OBJECTS = ("the valley", "the harbour", "a wooden fence", "the green hills", "the station", "the bakery",
                  "a narrow path", "the sleepy town", "the open field", "the stone wall")
FILLER_TIMES = ("at dawn", "every evening", "in the rain", "after lunch", "before winter", "on Sundays")


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
    """The generated texts. `heldout` is the multiple-choice task: {context, choices, gold} records."""

    seed: int
    people_a: tuple[Person, ...]
    people_b: tuple[Person, ...]
    heldout_names: frozenset[str]
    a_bios: tuple[str, ...]
    b_bios: tuple[str, ...]
    filler: tuple[str, ...]
    qa_train: tuple[str, ...]
    heldout: tuple[dict[str, Any], ...]

    def training_texts(self) -> list[str]:
        """Every text any run may train on (sources A, B and qa)."""
        return [*self.a_bios, *self.filler, *self.b_bios, *self.qa_train]


def question(attribute: str, name: str) -> str:
    return QUESTION_TEMPLATES[attribute].format(name=name)


def qa_pair(attribute: str, person: Person) -> str:
    return f"{question(attribute, person.name)} A: {person.attribute(attribute)}"


def biography(person: Person, rng: random.Random) -> str:
    """One biography: a sentence per attribute, each from a random template, in random order."""
    sentences = [rng.choice(BIO_TEMPLATES[key]).format(name=person.name, **{key: person.attribute(key)})
                 for key in ATTRIBUTES]
    rng.shuffle(sentences)
    return " ".join(sentences)


def filler_document(rng: random.Random, sentences: int) -> str:
    return " ".join(f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_OBJECTS)} "
                    f"{rng.choice(FILLER_TIMES)}." for _ in range(sentences))


def generate(seed: int = 0, *, people_a: int = 300, people_b: int = 150, bios_per_person: int = 3,
             filler_docs: int = 300, heldout_fraction: float = 0.2) -> Corpus:
    """The corpus for `seed`. Names are drawn without replacement, so A and B are disjoint."""
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if people_a + people_b > len(names):
        raise ValueError(f"people_a + people_b: {people_a + people_b}, expected at most {len(names)} names")
    if people_b < 2 or not 0.0 < heldout_fraction < 1.0:
        raise ValueError("expected people_b >= 2 and 0 < heldout_fraction < 1")
    rng = random.Random(seed)
    chosen = rng.sample(names, people_a + people_b)

    def person(name: str) -> Person:
        return Person(name, rng.choice(CITIES), rng.choice(PROFESSIONS), rng.choice(YEARS), rng.choice(HOBBIES))

    pop_a = tuple(person(n) for n in chosen[:people_a])
    pop_b = tuple(person(n) for n in chosen[people_a:])
    a_bios = tuple(biography(p, rng) for p in pop_a for _ in range(bios_per_person))
    b_bios = tuple(biography(p, rng) for p in pop_b for _ in range(bios_per_person))
    filler = tuple(filler_document(rng, rng.randint(3, 6)) for _ in range(filler_docs))

    n_heldout = max(1, min(people_b - 1, round(people_b * heldout_fraction)))
    heldout_people = pop_b[:n_heldout]  # pop_b is already in random order
    qa_train = tuple(qa_pair(key, p) for p in pop_b[n_heldout:] for key in ATTRIBUTES)
    heldout = []
    for p in heldout_people:
        for key in ATTRIBUTES:
            gold_value = p.attribute(key)
            distractors = rng.sample([v for v in VOCABULARY[key] if v != gold_value], 3)
            gold = rng.randrange(4)
            choices = distractors[:gold] + [gold_value] + distractors[gold:]
            heldout.append({"context": f"{question(key, p.name)} A:", "choices": choices, "gold": gold,
                            "name": p.name, "attribute": key})
    return Corpus(seed, pop_a, pop_b, frozenset(p.name for p in heldout_people), a_bios, b_bios, filler,
                  tuple(rng.sample(qa_train, len(qa_train))), tuple(heldout))


def _write_jsonl(path: str, texts: list[str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, path)


def write(corpus: Corpus, directory: str) -> dict[str, str]:
    """Write the corpus as JSONL files (field 'text') and the task file; returns {name: path}:
    A (A bios and filler, interleaved), B (B bios), qa (training QA), heldout_qa (the task)."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(corpus.seed + 1)
    a_docs = [*corpus.a_bios, *corpus.filler]
    rng.shuffle(a_docs)
    b_docs = list(corpus.b_bios)
    rng.shuffle(b_docs)
    # prepare holds out the last examples of a file as its val split: the held-out people's bios go
    # first, so that all their facts are trained on.
    b_docs.sort(key=lambda doc: not any(name in doc for name in corpus.heldout_names))
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("A", "B", "qa", "heldout_qa")}
    _write_jsonl(paths["A"], a_docs)
    _write_jsonl(paths["B"], b_docs)
    _write_jsonl(paths["qa"], list(corpus.qa_train))
    tmp = f"{paths['heldout_qa']}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for rec in corpus.heldout:
            f.write(json.dumps({k: rec[k] for k in ("context", "choices", "gold")}) + "\n")
    os.replace(tmp, paths["heldout_qa"])
    return paths
