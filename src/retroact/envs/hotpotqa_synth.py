"""``hotpotqa-synth``: generated multi-hop questions in HotpotQA format, small enough for CPU training.

A seeded generator builds a world of invented entities (countries, cities, people, films,
books, bands, towers) linked by facts, writes a short paragraph per entity, and asks bridge
questions (follow one link, then read an attribute) and comparison questions (compare an
attribute of two entities, or ask yes/no whether they share one). Each task carries its two
supporting paragraphs plus eight distractors. The train and test worlds are built from disjoint
entity names, so a test question never mentions or answers with a train entity. Actions,
observations and metrics are those of the ``hotpotqa`` env.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from retroact.envs.base import EnvSpec, Task, seeded_sample
from retroact.envs.hotpotqa import MAX_SENTENCES, MAX_STEPS, Corpus, HotpotQAEnv, corpus_factory
from retroact.envs.hotpotqa import SPEC as HOTPOTQA
from retroact.envs.hotpotqa_data import Paragraph

WORLD_SEED = 2503
POOL_SIZE = {"train": 2000, "test": 200}
"""Tasks generated per split; ``tasks(split, n, seed)`` samples from these."""
_SIZES = {  # entities per kind in each world
    "train": {"country": 20, "city": 120, "person": 600, "film": 300, "book": 200, "band": 120, "tower": 100},
    "test": {"country": 8, "city": 40, "person": 150, "film": 60, "book": 40, "band": 30, "tower": 25},
}
_SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "vor", "sil", "dan", "mer", "tho", "bel", "gri", "nor", "pa",
              "zu", "fen", "lin", "ro", "sa", "vi", "dor", "el", "mun", "tar", "qui", "bo", "ches", "wen")
_ADJECTIVES = ("Silent", "Golden", "Broken", "Hidden", "Last", "Crimson", "Distant", "Quiet", "Iron",
               "Paper", "Winter", "Burning", "Hollow", "Northern", "Velvet", "Glass", "Wild", "Lonely",
               "Bitter", "Copper", "Frozen", "Secret", "Scarlet", "Endless", "Pale", "Restless")
_NOUNS = ("Harbour", "Garden", "River", "Mirror", "Crown", "Lantern", "Voyage", "Orchard", "Signal",
          "Tide", "Bridge", "Letter", "Forest", "Engine", "Shadow", "Island", "Bell", "Compass",
          "Meadow", "Tower", "Song", "Storm", "Window", "Road", "Feather", "Clock")
_YEARS = {"country": (1800, 1990), "city": (900, 1800), "person": (1850, 1995), "film": (1925, 2020),
          "book": (1800, 2020), "band": (1955, 2020), "tower": (1850, 2020)}
_OCCUPATIONS = ("painter", "engineer", "chemist", "poet", "sculptor", "teacher")
_GENRES = ("drama", "comedy", "thriller", "western", "musical")
_STYLES = ("rock", "jazz", "folk", "punk", "soul")


@dataclass(eq=False)  # identity comparison: entities link to each other
class Entity:
    kind: str
    name: str
    year: int
    links: dict[str, Entity] = field(default_factory=dict)
    extra: str = ""
    """Occupation (person) or genre/style (film, band)."""

    @property
    def first(self) -> str:
        return self.name.split()[0]


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "ch", "sh")) else "s")


class _Names:
    """Unique invented names across both worlds: that is what keeps train and test disjoint."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set[str]()

    def _word(self, n: int) -> str:
        return "".join(self.rng.choice(_SYLLABLES) for _ in range(n)).capitalize()

    def new(self, kind: str) -> str:
        make: dict[str, Callable[[], str]] = {
            "country": lambda: self._word(2) + self.rng.choice(("ia", "land", "ora")),
            "city": lambda: self._word(2) + self.rng.choice(("burg", "ford", "haven", "wick", "dale")),
            "person": lambda: f"{self._word(2)} {self._word(3)}",
            "film": lambda: f"The {self.rng.choice(_ADJECTIVES)} {self.rng.choice(_NOUNS)}",
            "book": lambda: f"{_plural(self.rng.choice(_NOUNS))} of {self._word(2)}",
            "band": lambda: f"The {_plural(self._word(2))}",
            "tower": lambda: f"{self._word(2)} Tower",
        }
        for _ in range(10_000):
            name = make[kind]()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError(f"ran out of distinct {kind} names; make the synthetic world smaller")


def _build_world(names: _Names, sizes: dict[str, int], rng: random.Random) -> dict[str, list[Entity]]:
    def new(kind: str, **links: Entity) -> Entity:
        return Entity(kind, names.new(kind), rng.randint(*_YEARS[kind]), links)

    w: dict[str, list[Entity]] = {"country": [new("country") for _ in range(sizes["country"])]}
    w["city"] = [new("city", country=w["country"][i % sizes["country"]]) for i in range(sizes["city"])]
    for country in w["country"]:
        country.links["capital"] = rng.choice([c for c in w["city"] if c.links["country"] is country])
    w["person"] = [new("person", city=rng.choice(w["city"])) for _ in range(sizes["person"])]
    for p in w["person"]:
        p.extra = rng.choice(_OCCUPATIONS)
    for kind, role in (("film", "director"), ("book", "author"), ("band", "founder"), ("tower", "architect")):
        w[kind] = [new(kind, **{role: rng.choice(w["person"])}) for _ in range(sizes[kind])]
    for e in w["film"]:
        e.extra = rng.choice(_GENRES)
    for e in w["band"]:
        e.extra = rng.choice(_STYLES)
    for e in w["tower"]:
        e.links["city"] = rng.choice(w["city"])
    return w


def paragraph(e: Entity) -> Paragraph:
    """The entity's short paragraph; as in HotpotQA, sentences after the first start with a space."""
    ln = e.links
    if e.kind == "country":
        first = f"is a country whose capital is {ln['capital'].name}"
        second = f"It became independent in {e.year}"
    elif e.kind == "city":
        first, second = f"is a city in {ln['country'].name}", f"It was founded in {e.year}"
    elif e.kind == "person":
        article = "an" if e.extra[0] in "aeiou" else "a"
        first, second = f"is {article} {e.extra} born in {e.year}", f"{e.first} was born in {ln['city'].name}"
    elif e.kind == "film":
        first, second = f"is a {e.year} {e.extra} film", f"It was directed by {ln['director'].name}"
    elif e.kind == "book":
        first, second = f"is a novel published in {e.year}", f"It was written by {ln['author'].name}"
    elif e.kind == "band":
        first, second = f"is a {e.extra} band formed in {e.year}", f"It was founded by {ln['founder'].name}"
    else:
        first = f"is a tower in {ln['city'].name}"
        second = f"It was designed by {ln['architect'].name} and completed in {e.year}"
    return Paragraph(e.name, (f"{e.name} {first}.", f" {second}."))


# Where each fact sits in its paragraph (sentence index), for supporting facts.
_LINK_SENTENCE = {"capital": 0, "country": 0, "city": 1, "director": 1, "author": 1, "founder": 1,
                  "architect": 1}
_YEAR_SENTENCE = {"country": 1, "city": 1, "person": 0, "film": 0, "book": 0, "band": 0, "tower": 1}


_BRIDGES = (("film", "director", "the director of"), ("book", "author", "the author of"),
            ("band", "founder", "the founder of"), ("tower", "architect", "the architect of"),
            ("city", "country", "the country of"), ("person", "city", "the birthplace of"))
"""(kind asked about, link followed, how the question names the linked entity)."""


def _bridge(w: dict[str, list[Entity]], rng: random.Random) -> tuple[str, str, list[Entity], list[list]]:
    kind, role, noun = rng.choice(_BRIDGES)
    a = rng.choice(w[kind])
    b = a.links[role]
    facts: list[list] = [[a.name, _LINK_SENTENCE[role]]]
    if b.kind == "person":
        if rng.random() < 0.5:
            q, ans, fact = f"In which city was {noun} {a.name} born?", b.links["city"].name, [b.name, 1]
        else:
            q, ans, fact = f"In what year was {noun} {a.name} born?", str(b.year), [b.name, 0]
    elif b.kind == "country":
        q, ans, fact = f"What is the capital of {noun} {a.name}?", b.links["capital"].name, [b.name, 0]
    else:  # a person's birthplace, a city
        q, ans, fact = f"In which country is {noun} {a.name}?", b.links["country"].name, [b.name, 0]
    return q, ans, [a, b], [*facts, fact]


def _comparison(w: dict[str, list[Entity]], rng: random.Random) -> tuple[str, str, list[Entity], list[list]]:
    kind = rng.choice(("person", "film", "city", "book"))
    a, b = rng.sample(w[kind], 2)
    if kind == "person" and rng.random() < 0.5:
        if rng.random() < 0.5:  # half of these share a birthplace, so yes and no are balanced
            same = [p for p in w["person"] if p is not a and p.links["city"] is a.links["city"]]
            b = rng.choice(same) if same else b
        ans = "yes" if a.links["city"] is b.links["city"] else "no"
        return f"Were {a.name} and {b.name} born in the same city?", ans, [a, b], [[a.name, 1], [b.name, 1]]
    while a.year == b.year:
        b = rng.choice(w[kind])
    verb = {"person": ("Who was born earlier", 0), "film": ("Which film came out first", 0),
            "city": ("Which city was founded first", 1), "book": ("Which novel was published first", 0)}
    text, sent = verb[kind]
    ans = a.name if a.year < b.year else b.name
    return f"{text}, {a.name} or {b.name}?", ans, [a, b], [[a.name, sent], [b.name, sent]]


@dataclass(frozen=True)
class SynthData:
    tasks: dict[str, tuple[Task, ...]]
    paragraphs: tuple[Paragraph, ...]


@lru_cache(maxsize=2)
def generate(seed: int = WORLD_SEED, train: int = POOL_SIZE["train"],
             test: int = POOL_SIZE["test"]) -> SynthData:
    """Both splits' task pools and every paragraph of both worlds, deterministic per seed."""
    rng = random.Random(seed)
    names = _Names(rng)
    worlds = {split: _build_world(names, _SIZES[split], rng) for split in ("train", "test")}
    texts = {id(e): paragraph(e) for w in worlds.values() for kind in w.values() for e in kind}
    out: dict[str, tuple[Task, ...]] = {}
    for split, count in (("train", train), ("test", test)):
        w = worlds[split]
        everyone = [e for kind in w.values() for e in kind]
        seen: set[str] = set()
        tasks: list[Task] = []
        while len(tasks) < count:
            qtype = "comparison" if rng.random() < 0.3 else "bridge"
            draw = _comparison if qtype == "comparison" else _bridge
            q, ans, support, facts = draw(w, rng)
            # Redraw the same type, so rejects do not skew the type mix. A bridge answer named in
            # its own question (a capital asked about through itself) would be trivial.
            while q in seen or (qtype == "bridge" and ans in q):
                q, ans, support, facts = draw(w, rng)
            seen.add(q)
            distractors: list[Entity] = []
            while len(distractors) < 8:
                # The first half share a kind with a supporting entity, so the titles compete.
                e = rng.choice(w[rng.choice(support).kind] if len(distractors) < 4 else everyone)
                if e not in support and e not in distractors:
                    distractors.append(e)
            context = [texts[id(e)] for e in support + distractors]
            rng.shuffle(context)
            payload: dict[str, Any] = {
                "question": q, "answer": ans, "type": qtype, "level": "synth", "supporting_facts": facts,
                "context": [[p.title, list(p.sentences)] for p in context],
            }
            tasks.append(Task(f"synth-{split}-{len(tasks):05d}", split, payload))
        out[split] = tuple(tasks)
    return SynthData(out, tuple(texts.values()))


def tasks(split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    if split not in POOL_SIZE:
        raise ValueError(f"hotpotqa-synth has no split {split!r}; splits: train, test")
    return seeded_sample(generate().tasks[split], n, seed)


@lru_cache(maxsize=2)
def _all_corpus(retriever: str, model_dir: str | None, min_score: float | None) -> Corpus:
    return Corpus(generate().paragraphs, retriever, model_dir, min_score)


def make(*, corpus: str = "task", retriever: str = "bm25", model_dir: str | None = None,
         min_score: float | None = None, max_steps: int = MAX_STEPS,
         max_sentences: int = MAX_SENTENCES) -> HotpotQAEnv:
    """The ``hotpotqa`` env over synthetic tasks; ``corpus="all"`` searches both worlds' paragraphs."""
    factory = corpus_factory(corpus, retriever, model_dir, min_score,
                             lambda: _all_corpus(retriever, model_dir, min_score))
    return HotpotQAEnv(factory, max_steps, max_sentences)


SPEC = EnvSpec(
    name="hotpotqa-synth",
    make=make,
    tasks=tasks,
    experts=HOTPOTQA.experts,
    prompts=HOTPOTQA.prompts,
    max_steps=MAX_STEPS,
    memory_size=None,
    reflector_sees_memory=False,
)
