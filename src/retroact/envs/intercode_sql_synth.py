"""``intercode_sql-synth``: generated small databases and questions with gold SQL, for CPU-sized models.

Every database has one schema shape, a parent table and a child table that points to it::

    <parent>(id, <name>, <category>, <number>)      <child>(id, <name>, <category>, <number>, <parent>_id)

with names that differ per domain (teams and players, authors and books, ...). Questions come
from templates covering filters, counts, joins, group-by (with and without HAVING), order-by
and top-k; values are picked from the generated rows so answers are never empty, and sorted
columns have no ties, so the gold order is unique. Train and test use disjoint domains (so
disjoint schemas). Everything is a pure function of (domain, seed): databases are built in
memory on demand, nothing is written to disk.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from retroact.envs.base import EnvSpec, Task, seeded_sample
from retroact.envs.intercode_sql import PROMPTS, SqlEnv
from retroact.envs.intercode_sql_expert import MAX_STEPS, make_experts
from retroact.envs.sql_sandbox import SandboxLimits, SqlSandbox

GENERATOR_VERSION = 1
"""Bump when generated data changes; it is part of the gold-cache key."""
DBS_PER_DOMAIN = {"train": 12, "test": 4}
QUESTIONS_PER_DB = 9

_PEOPLE = [
    "Ada",
    "Bruno",
    "Chen",
    "Dara",
    "Elif",
    "Femi",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kemal",
    "Lena",
    "Milo",
    "Nour",
    "Oren",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tess",
    "Umar",
    "Vera",
    "Wren",
    "Yusuf",
    "Zoe",
]


@dataclass(frozen=True)
class Entity:
    """One table: its name, noun forms, and three typed columns with the words questions use for them."""

    table: str
    singular: str
    plural: str
    name_col: str
    names: tuple[str, ...]
    cat_col: str
    cat_words: str
    cats: tuple[str, ...]
    num_col: str
    num_words: str
    num_range: tuple[int, int]


@dataclass(frozen=True)
class Domain:
    name: str
    parent: Entity
    child: Entity


def _e(
    table: str,
    plural: str,
    name_col: str,
    names: list[str],
    cat: tuple[str, str, list[str]],
    num: tuple[str, str, int, int],
    singular: str | None = None,
) -> Entity:
    return Entity(
        table,
        singular or table,
        plural,
        name_col,
        tuple(names),
        cat[0],
        cat[1],
        tuple(cat[2]),
        num[0],
        num[1],
        (num[2], num[3]),
    )


DOMAINS: tuple[Domain, ...] = (
    Domain(
        "league",
        _e(
            "team",
            "teams",
            "name",
            ["Lions", "Hawks", "Rovers", "Comets", "Pilots", "Otters", "Giants"],
            ("city", "city", ["Leeds", "Porto", "Lyon", "Turin"]),
            ("founded", "founding year", 1880, 2010),
        ),
        _e(
            "player",
            "players",
            "name",
            _PEOPLE,
            ("position", "position", ["Forward", "Defender", "Keeper"]),
            ("goals", "goal count", 0, 60),
        ),
    ),
    Domain(
        "library",
        _e(
            "author",
            "authors",
            "name",
            _PEOPLE[::-1],
            ("country", "country", ["Chile", "Kenya", "Norway"]),
            ("birth_year", "birth year", 1920, 1995),
        ),
        _e(
            "book",
            "books",
            "title",
            [
                "Salt Road",
                "Night Ferry",
                "Paper Moons",
                "Cold Orchard",
                "Glass Hive",
                "Quiet Tide",
                "Iron Garden",
                "Lost Atlas",
                "Blue Lantern",
                "Red Delta",
                "Stone Choir",
                "Far Harbour",
                "Wild Ledger",
                "Tin Crown",
                "Ash Meadow",
                "Long Winter",
            ],
            ("genre", "genre", ["Mystery", "Poetry", "History", "Fantasy"]),
            ("pages", "page count", 90, 900),
        ),
    ),
    Domain(
        "school",
        _e(
            "teacher",
            "teachers",
            "name",
            _PEOPLE[5:] + _PEOPLE[:5],
            ("subject", "subject", ["Maths", "Art", "Biology"]),
            ("years_taught", "years of teaching", 1, 40),
        ),
        _e(
            "pupil",
            "pupils",
            "name",
            _PEOPLE[3:] + _PEOPLE[:3],
            ("house", "house", ["Oak", "Elm", "Ash", "Yew"]),
            ("score", "test score", 20, 100),
        ),
    ),
    Domain(
        "zoo",
        _e(
            "keeper",
            "keepers",
            "name",
            _PEOPLE[8:] + _PEOPLE[:8],
            ("shift", "shift", ["Morning", "Evening"]),
            ("age", "age", 20, 65),
        ),
        _e(
            "animal",
            "animals",
            "nickname",
            [
                "Biscuit",
                "Pepper",
                "Mango",
                "Noodle",
                "Ziggy",
                "Clover",
                "Maple",
                "Pebble",
                "Sprout",
                "Waffle",
                "Juniper",
                "Olive",
                "Tofu",
                "Rumi",
            ],
            ("species", "species", ["Tiger", "Otter", "Zebra", "Parrot"]),
            ("weight_kg", "weight in kg", 1, 400),
        ),
    ),
    Domain(
        "music",
        _e(
            "band",
            "bands",
            "name",
            ["Velvet Fox", "Neon Tide", "The Quills", "Paper Kites", "Low Sun", "Echo Park", "Mild Fever"],
            ("genre", "genre", ["Rock", "Jazz", "Folk"]),
            ("formed", "year of forming", 1960, 2020),
        ),
        _e(
            "album",
            "albums",
            "title",
            [
                "First Light",
                "Undertow",
                "Slow Burn",
                "Open Road",
                "Static",
                "Hollow",
                "Daybreak",
                "Afterglow",
                "Tidal",
                "Copper",
                "Drift",
                "Midnight",
                "Northbound",
                "Satellite",
            ],
            ("label", "record label", ["Arc", "Bloom", "Crest"]),
            ("copies_sold", "copies sold", 1000, 90000),
        ),
    ),
    Domain(
        "retail",
        _e(
            "store",
            "stores",
            "name",
            ["Northgate", "Riverside", "Old Town", "Harbour", "Hillcrest", "Westfield"],
            ("district", "district", ["North", "South", "Centre"]),
            ("opened", "opening year", 1970, 2022),
        ),
        _e(
            "product",
            "products",
            "name",
            [
                "Kettle",
                "Lamp",
                "Blender",
                "Toaster",
                "Fan",
                "Heater",
                "Mixer",
                "Clock",
                "Radio",
                "Scale",
                "Grill",
                "Juicer",
                "Iron",
                "Vacuum",
            ],
            ("category", "category", ["Kitchen", "Home", "Garden"]),
            ("price", "price", 5, 400),
        ),
    ),
    Domain(
        "cinema",
        _e(
            "studio",
            "studios",
            "name",
            ["Lumen", "Northlight", "Big Reel", "Marble", "Foxglove", "Aurora"],
            ("city", "city", ["Mumbai", "Seoul", "Austin"]),
            ("founded", "founding year", 1910, 2015),
        ),
        _e(
            "film",
            "films",
            "title",
            [
                "Dust",
                "Harbor Lights",
                "The Long Hour",
                "Mirror Lake",
                "Summer Glass",
                "Night Train",
                "Paper Tigers",
                "Red Sky",
                "Second Wind",
                "Storm Season",
                "The Orchard",
                "Vanishing Point",
                "Wildfire",
                "Zero Hour",
            ],
            ("genre", "genre", ["Drama", "Comedy", "Thriller", "Horror"]),
            ("runtime", "runtime in minutes", 70, 200),
        ),
    ),
    Domain(
        "farm",
        _e(
            "farm",
            "farms",
            "name",
            ["Green Acre", "Hilltop", "Sunny Vale", "Willow Creek", "Oak Ridge", "Mill Farm"],
            ("region", "region", ["Coast", "Valley", "Plains"]),
            ("acres", "area in acres", 20, 900),
        ),
        _e(
            "field",
            "fields",
            "label",
            ["F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9", "F10", "F11", "F12", "F13", "F14"],
            ("crop", "crop", ["Wheat", "Barley", "Maize", "Oats"]),
            ("yield_tons", "yield in tons", 2, 300),
        ),
    ),
    Domain(
        "company",
        _e(
            "department",
            "departments",
            "name",
            ["Sales", "Legal", "Research", "Support", "Finance", "Design"],
            ("building", "building", ["Tower A", "Tower B", "Annex"]),
            ("budget", "budget", 50, 900),
        ),
        _e(
            "employee",
            "employees",
            "name",
            _PEOPLE[10:] + _PEOPLE[:10],
            ("role", "role", ["Analyst", "Manager", "Intern"]),
            ("salary", "salary", 20, 200),
        ),
    ),
    # test domains: never seen in training
    Domain(
        "hospital",
        _e(
            "ward",
            "wards",
            "name",
            ["Cedar", "Birch", "Rowan", "Alder", "Hazel", "Linden"],
            ("floor_name", "floor", ["Ground", "First", "Second"]),
            ("beds", "number of beds", 6, 60),
        ),
        _e(
            "patient",
            "patients",
            "name",
            _PEOPLE[12:] + _PEOPLE[:12],
            ("blood_type", "blood type", ["A", "B", "O"]),
            ("age", "age", 1, 99),
        ),
    ),
    Domain(
        "airline",
        _e(
            "airline",
            "airlines",
            "name",
            ["SkyWay", "Blue Jet", "AeroNord", "Sunwing", "Polar Air", "Kestrel"],
            ("country", "country", ["Peru", "Japan", "Ghana"]),
            ("fleet_size", "fleet size", 5, 300),
        ),
        _e(
            "route",
            "routes",
            "code",
            [
                "R10",
                "R11",
                "R12",
                "R13",
                "R14",
                "R15",
                "R16",
                "R17",
                "R18",
                "R19",
                "R20",
                "R21",
                "R22",
                "R23",
            ],
            ("destination", "destination", ["Oslo", "Cairo", "Lima", "Quito"]),
            ("distance_km", "distance in km", 200, 9000),
        ),
    ),
    Domain(
        "kitchen",
        _e(
            "chef",
            "chefs",
            "name",
            _PEOPLE[15:] + _PEOPLE[:15],
            ("cuisine", "cuisine", ["Thai", "French", "Mexican"]),
            ("experience", "years of experience", 1, 35),
        ),
        _e(
            "dish",
            "dishes",
            "name",
            [
                "Soup",
                "Risotto",
                "Tacos",
                "Curry",
                "Salad",
                "Pie",
                "Stew",
                "Dumplings",
                "Noodles",
                "Paella",
                "Omelette",
                "Gnocchi",
                "Chili",
                "Tart",
            ],
            ("course", "course", ["Starter", "Main", "Dessert"]),
            ("price", "price", 3, 60),
            singular="dish",
        ),
    ),
)
TEST_DOMAINS = frozenset({"hospital", "airline", "kitchen"})


def domains(split: str) -> list[Domain]:
    if split not in DBS_PER_DOMAIN:
        raise ValueError(f"intercode_sql-synth has splits train and test, not {split!r}")
    return [d for d in DOMAINS if (d.name in TEST_DOMAINS) == (split == "test")]


def _domain(name: str) -> Domain:
    for d in DOMAINS:
        if d.name == name:
            return d
    raise KeyError(f"unknown synthetic SQL domain {name!r}")


Row = tuple[int, str, str, int, int]
"""(id, name, category, number, parent id); parents use 0 as parent id."""


@lru_cache(maxsize=512)
def database_rows(domain_name: str, seed: int) -> tuple[tuple[Row, ...], tuple[Row, ...]]:
    """(parent rows, child rows) of one generated database; numbers within a table are distinct."""
    d = _domain(domain_name)
    rng = random.Random(f"sql-synth:{GENERATOR_VERSION}:{domain_name}:{seed}")

    def rows(e: Entity, n: int, parents: int) -> tuple[Row, ...]:
        names = rng.sample(e.names, n)
        nums = rng.sample(range(e.num_range[0], e.num_range[1] + 1), n)
        return tuple(
            (i + 1, names[i], rng.choice(e.cats), nums[i], rng.randint(1, parents) if parents else 0)
            for i in range(n)
        )

    parents = rows(d.parent, rng.randint(4, 6), 0)
    return parents, rows(d.child, rng.randint(8, min(12, len(d.child.names))), len(parents))


def _fk(d: Domain) -> str:
    return f"{d.parent.table}_id"


def db_tables(d: Domain) -> dict[str, list[str]]:
    p, c = d.parent, d.child
    return {
        p.table: ["id", p.name_col, p.cat_col, p.num_col],
        c.table: ["id", c.name_col, c.cat_col, c.num_col, _fk(d)],
    }


@lru_cache(maxsize=256)
def database_image(domain_name: str, seed: int) -> bytes:
    """The serialised SQLite database of (domain, seed)."""
    d = _domain(domain_name)
    parents, children = database_rows(domain_name, seed)
    p, c = d.parent, d.child
    con = sqlite3.connect(":memory:")
    try:
        con.execute(
            f"CREATE TABLE {p.table} (id INTEGER PRIMARY KEY, {p.name_col} TEXT, {p.cat_col} TEXT, "
            f"{p.num_col} INTEGER)"
        )
        con.execute(
            f"CREATE TABLE {c.table} (id INTEGER PRIMARY KEY, {c.name_col} TEXT, {c.cat_col} TEXT, "
            f"{c.num_col} INTEGER, {_fk(d)} INTEGER REFERENCES {p.table}(id))"
        )
        con.executemany(f"INSERT INTO {p.table} VALUES (?, ?, ?, ?)", [r[:4] for r in parents])
        con.executemany(f"INSERT INTO {c.table} VALUES (?, ?, ?, ?, ?)", children)
        con.commit()
        return con.serialize()
    finally:
        con.close()


def _q(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


Question = tuple[str, str]
"""(question, gold SQL)"""


def _templates(
    d: Domain, parents: tuple[Row, ...], children: tuple[Row, ...], rng: random.Random
) -> dict[str, Callable[[], Question | None]]:
    """Question makers of one database; a maker returns None when its question would be ambiguous."""
    p, c = d.parent, d.child
    join = f"FROM {c.table} AS T1 JOIN {p.table} AS T2 ON T1.{_fk(d)} = T2.id"
    nums = sorted(r[3] for r in children)
    per_parent = Counter(r[4] for r in children)
    used_parents = [r for r in parents if per_parent[r[0]]]

    def filter_num() -> Question:
        v = nums[len(nums) // 2]
        return (
            f"List the {c.name_col}s of {c.plural} whose {c.num_words} is greater than {v}.",
            f"SELECT {c.name_col} FROM {c.table} WHERE {c.num_col} > {v}",
        )

    def filter_cat() -> Question:
        v = rng.choice([r[2] for r in children])
        return (
            f"Give the {c.name_col}s of the {c.plural} whose {c.cat_words} is {v}.",
            f"SELECT {c.name_col} FROM {c.table} WHERE {c.cat_col} = {_q(v)}",
        )

    def count_cat() -> Question:
        v = rng.choice([r[2] for r in children])
        return (
            f"How many {c.plural} have {c.cat_words} {v}?",
            f"SELECT count(*) FROM {c.table} WHERE {c.cat_col} = {_q(v)}",
        )

    def order_desc() -> Question:
        return (
            f"List the {c.name_col}s of all {c.plural} from the highest {c.num_words} to the lowest.",
            f"SELECT {c.name_col} FROM {c.table} ORDER BY {c.num_col} DESC",
        )

    def lowest() -> Question:
        return (
            f"Which {c.singular} has the lowest {c.num_words}? Give its {c.name_col}.",
            f"SELECT {c.name_col} FROM {c.table} ORDER BY {c.num_col} ASC LIMIT 1",
        )

    def top_three() -> Question:
        return (
            f"What are the {c.name_col}s of the three {c.plural} with the highest {c.num_words}?",
            f"SELECT {c.name_col} FROM {c.table} ORDER BY {c.num_col} DESC LIMIT 3",
        )

    def group_count() -> Question:
        return (
            f"How many {c.plural} are there for each {c.cat_words}?",
            f"SELECT {c.cat_col}, count(*) FROM {c.table} GROUP BY {c.cat_col}",
        )

    def group_avg() -> Question:
        return (
            f"What is the average {c.num_words} of the {c.plural} for each {c.cat_words}?",
            f"SELECT {c.cat_col}, avg({c.num_col}) FROM {c.table} GROUP BY {c.cat_col}",
        )

    def join_parent_name() -> Question:
        v = rng.choice(used_parents)[1]
        return (
            f"List the {c.name_col}s of the {c.plural} of the {p.singular} whose {p.name_col} is {v}.",
            f"SELECT T1.{c.name_col} {join} WHERE T2.{p.name_col} = {_q(v)}",
        )

    def join_parent_cat() -> Question:
        v = rng.choice(used_parents)[2]
        return (
            f"List the {c.name_col}s of the {c.plural} whose {p.singular} has {p.cat_words} {v}.",
            f"SELECT T1.{c.name_col} {join} WHERE T2.{p.cat_col} = {_q(v)}",
        )

    def join_count() -> Question:
        return (
            f"For each {p.singular} that has {c.plural}, give its {p.name_col} and its number of {c.plural}.",
            f"SELECT T2.{p.name_col}, count(*) {join} GROUP BY T2.id",
        )

    def having() -> Question | None:
        counts = sorted(per_parent.values())
        k = counts[len(counts) // 2]
        if k >= counts[-1]:
            return None
        return (
            f"Which {p.plural} have more than {k} {c.plural}? Give their {p.name_col}s.",
            f"SELECT T2.{p.name_col} {join} GROUP BY T2.id HAVING count(*) > {k}",
        )

    def join_order() -> Question:
        return (
            f"List each {c.singular}'s {c.name_col} with its {p.singular}'s {p.name_col}, "
            f"ordered by {c.num_words} from lowest to highest.",
            f"SELECT T1.{c.name_col}, T2.{p.name_col} {join} ORDER BY T1.{c.num_col} ASC",
        )

    def most_children() -> Question | None:
        top = per_parent.most_common(2)
        if len(top) > 1 and top[0][1] == top[1][1]:
            return None
        return (
            f"Which {p.singular} has the most {c.plural}? Give its {p.name_col}.",
            f"SELECT T2.{p.name_col} {join} GROUP BY T2.id ORDER BY count(*) DESC LIMIT 1",
        )

    def max_num() -> Question:
        return (
            f"What is the highest {c.num_words} of any {c.singular}?",
            f"SELECT max({c.num_col}) FROM {c.table}",
        )

    def parent_filter() -> Question:
        v = sorted(r[3] for r in parents)[len(parents) // 2]
        return (
            f"List the {p.name_col}s of the {p.plural} whose {p.num_words} is below {v}.",
            f"SELECT {p.name_col} FROM {p.table} WHERE {p.num_col} < {v}",
        )

    return {
        f.__name__: f
        for f in (
            filter_num,
            filter_cat,
            count_cat,
            order_desc,
            lowest,
            top_three,
            group_count,
            group_avg,
            join_parent_name,
            join_parent_cat,
            join_count,
            having,
            join_order,
            most_children,
            max_num,
            parent_filter,
        )
    }


def database_tasks(domain_name: str, seed: int, split: str) -> list[Task]:
    """The questions asked of one generated database."""
    d = _domain(domain_name)
    parents, children = database_rows(domain_name, seed)
    rng = random.Random(f"sql-synth-questions:{GENERATOR_VERSION}:{domain_name}:{seed}")
    makers = _templates(d, parents, children, rng)
    tasks = []
    for kind in rng.sample(sorted(makers), len(makers)):
        made = makers[kind]()
        if made is None:
            continue
        question, gold = made
        payload = {
            "domain": domain_name,
            "db_seed": seed,
            "db": f"{domain_name}_{seed}",
            "question": question,
            "gold": gold,
            "kind": kind,
            "db_tables": db_tables(d),
        }
        tasks.append(Task(id=f"{domain_name}-{seed}-{kind}", split=split, payload=payload))
        if len(tasks) == QUESTIONS_PER_DB:
            break
    return tasks


@lru_cache(maxsize=2)
def _split_tasks(split: str) -> tuple[Task, ...]:
    return tuple(
        t
        for d in domains(split)
        for seed in range(DBS_PER_DOMAIN[split])
        for t in database_tasks(d.name, seed, split)
    )


def list_tasks(split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    return seeded_sample(_split_tasks(split), n, seed)


class SynthSqlEnv(SqlEnv):
    """The InterCode-SQL interaction on generated in-memory databases."""

    def database(self, task: Task) -> tuple[str, Callable[[], SqlSandbox]]:
        domain, seed = task.payload["domain"], int(task.payload["db_seed"])
        key = f"synth:{GENERATOR_VERSION}:{domain}:{seed}"
        return key, lambda: SqlSandbox.from_bytes(database_image(domain, seed), self.limits, name=key)


def make_env(*, max_rows_shown: int = 25, max_obs_chars: int = 350, timeout_s: float = 2.0) -> SynthSqlEnv:
    return SynthSqlEnv(
        max_rows_shown=max_rows_shown, max_obs_chars=max_obs_chars, limits=SandboxLimits(timeout_s=timeout_s)
    )


SPEC = EnvSpec(
    name="intercode_sql-synth",
    make=make_env,
    tasks=list_tasks,
    experts=make_experts,
    prompts=PROMPTS,
    max_steps=MAX_STEPS,
    memory_size=3,
)
