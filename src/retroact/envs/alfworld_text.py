"""ALFWorld's text grammar, shared by the built-in household world and an adapter over the real game.

- :func:`parse_action` turns a raw model line into a canonical :class:`Action`; ``str(action)`` is
  the command ALFWorld's (pre-0.4) engine accepts, e.g. ``put apple 1 in/on fridge 1``.
- :func:`clean_observation` drops the engine's banner and "You arrive at ..." prefixes so text looks
  like the ReAct prompts; :func:`item_list` writes lists the way the engine does.
- :func:`parse_goal`, :func:`listed_items` and :func:`room_receptacles` read observations back.
- :data:`LIKELY_PLACES` is a common-sense prior: where each object type tends to be, best first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

NOTHING = "Nothing happens."
"""The engine's answer to an action it cannot carry out."""

# Verb -> canonical command; ``{obj}`` is an object ("apple 1"), ``{place}`` a receptacle ("fridge 1").
COMMANDS = {
    "go": "go to {place}",
    "open": "open {place}",
    "close": "close {place}",
    "take": "take {obj} from {place}",
    "put": "put {obj} in/on {place}",
    "clean": "clean {obj} with {place}",
    "heat": "heat {obj} with {place}",
    "cool": "cool {obj} with {place}",
    "use": "use {obj}",
    "examine": "examine {obj}",
    "inventory": "inventory",
    "look": "look",
    "think": "think: {obj}",
}
_N = r"(?P<obj>.+?)"
_P = r"(?P<place>.+)"
# Tried in order; each matches a whole lower-cased line. Synonyms cover common model slips and
# ALFWorld>=0.4's "move X to Y".
_PATTERNS = [(verb, re.compile(pat)) for verb, pat in [
    ("think", r"think\s*:\s*(?P<obj>.*)"),
    ("go", rf"go\s*to\s+{_P}"),
    ("open", rf"open\s+{_P}"),
    ("close", rf"close\s+{_P}"),
    ("take", rf"(?:take|pick\s+up|get)\s+{_N}\s+from\s+{_P}"),
    ("put", rf"(?:put|place|move)\s+{_N}\s+(?:in\s*/\s*on|into|onto|in|on|to)\s+{_P}"),
    ("clean", rf"clean\s+{_N}\s+(?:with|using|in)\s+{_P}"),
    ("heat", rf"heat\s+{_N}\s+(?:with|using|in)\s+{_P}"),
    ("cool", rf"cool\s+{_N}\s+(?:with|using|in)\s+{_P}"),
    ("use", r"(?:use|toggle|turn\s+on)\s+(?P<obj>.+)"),
    ("examine", r"(?:examine|look\s+at)\s+(?P<obj>.+)"),
    ("inventory", r"inventory|inv"),
    ("look", r"look(?:\s+around)?"),
]]


@dataclass(frozen=True)
class Action:
    """A parsed command: ``verb`` is a key of :data:`COMMANDS`; for ``think``, ``obj`` is the thought."""

    verb: str
    obj: str = ""
    place: str = ""

    def __str__(self) -> str:
        return COMMANDS[self.verb].format(obj=self.obj, place=self.place)


def _name(text: str) -> str:
    """``"the Cabinet1"`` -> ``"cabinet 1"``: no leading article, a space before the number."""
    text = re.sub(r"^(?:the|a|an|some)\s+", "", text.strip())
    return re.sub(r"(?<=[a-z])(?=\d)", " ", text)


def parse_action(line: str) -> Action | None:
    """The canonical action of a model line, or None when it matches no command form.

    Case, extra spaces, a leading ``>``, a trailing period, articles and ``in``/``on``/``in/on``
    variants are all accepted; arguments are not checked against any world.
    """
    text = " ".join(line.lower().split()).lstrip("> ").rstrip(" .")
    for verb, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            groups = m.groupdict()
            if verb == "think":
                return Action("think", groups["obj"].strip())
            return Action(verb, _name(groups.get("obj") or ""), _name(groups.get("place") or ""))
    return None


def clean_observation(text: str) -> str:
    """Engine text as in the ReAct prompts: no banner, no "You arrive at ...", one line per paragraph."""
    text = re.sub(r"-= Welcome to TextWorld, ALFRED! =-", "", text)
    text = re.sub(r"You arrive at [^.]*\.\s*", "", text)
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def item_list(names: Sequence[str]) -> str:
    """``["apple 1", "egg 2"]`` -> ``"a apple 1, and a egg 2"`` (the engine always writes "a")."""
    items = [f"a {n}" for n in names]
    if not items:
        return "nothing"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ", and " + items[-1]


def listed_items(observation: str) -> list[str]:
    """Names after the first "you see" of an observation, e.g. ``["cloth 1", "soapbar 1"]``."""
    _, found, rest = observation.partition("you see ")
    return re.findall(r"\ban? ([a-z]+ \d+)", rest.split("\n")[0]) if found else []


def room_receptacles(first_observation: str) -> list[str]:
    """The receptacles a first observation lists ("Looking quickly around you, you see ...")."""
    for line in first_observation.splitlines():
        if "Looking quickly around you" in line:
            return listed_items(line)
    return []


def kind_of(name: str) -> str:
    """``"cabinet 12"`` -> ``"cabinet"``."""
    return name.rsplit(" ", 1)[0]


def number_of(name: str) -> int:
    """``"cabinet 12"`` -> 12 (0 when the name has no number)."""
    tail = name.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdecimal() else 0


# -- goals ------------------------------------------------------------------------------------

TOOLS = {"clean": "sinkbasin", "heat": "microwave", "cool": "fridge"}
"""The receptacle type that cleans, heats or cools an object."""
TASK_KINDS = ("put", "clean", "heat", "cool", "examine", "puttwo")
LAMP = "desklamp"

# ALFWorld's two templated phrasings per task type.
GOAL_TEMPLATES = {
    "put": ("put a {obj} in {target}", "put some {obj} on {target}"),
    "clean": ("clean some {obj} and put it in {target}", "put a clean {obj} in {target}"),
    "heat": ("heat some {obj} and put it in {target}", "put a hot {obj} in {target}"),
    "cool": ("cool some {obj} and put it in {target}", "put a cool {obj} in {target}"),
    "examine": ("look at {obj} under the {target}", "examine the {obj} with the {target}"),
    "puttwo": ("put two {obj} in {target}", "find two {obj} and put them in {target}"),
}


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{obj\}", r"(?P<obj>\w+)")
                      .replace(r"\{target\}", r"(?P<target>\w+)"))


_GOAL_PATTERNS = [(kind, _template_regex(t)) for kind, pair in GOAL_TEMPLATES.items() for t in pair]


@dataclass(frozen=True)
class Goal:
    kind: str
    """One of :data:`TASK_KINDS`."""
    obj: str
    target: str
    """Receptacle type to put the object in/on; :data:`LAMP` for ``examine``."""

    def text(self, phrasing: int = 0) -> str:
        return GOAL_TEMPLATES[self.kind][phrasing].format(obj=self.obj, target=self.target) + "."


def parse_goal(observation: str) -> Goal | None:
    """The goal in a "Your task is to: ..." line, or None if absent or not templated."""
    m = re.search(r"Your task is to: (.+)", observation)
    if not m:
        return None
    sentence = m.group(1).strip().rstrip(".").lower()
    for kind, pattern in _GOAL_PATTERNS:
        g = pattern.fullmatch(sentence)
        if g:
            return Goal(kind, g["obj"], g["target"])
    return None


# -- priors -----------------------------------------------------------------------------------

LIKELY_PLACES: dict[str, tuple[str, ...]] = {
    # kitchen
    "apple": ("fridge", "diningtable", "countertop", "sinkbasin", "garbagecan"),
    "bread": ("countertop", "diningtable", "cabinet", "fridge"),
    "egg": ("fridge", "countertop", "diningtable", "sinkbasin", "garbagecan"),
    "lettuce": ("fridge", "countertop", "diningtable"),
    "potato": ("fridge", "countertop", "diningtable", "sinkbasin", "garbagecan"),
    "tomato": ("fridge", "countertop", "diningtable", "sinkbasin", "garbagecan"),
    "mug": ("coffeemachine", "cabinet", "countertop", "sinkbasin", "diningtable"),
    "cup": ("cabinet", "countertop", "sinkbasin", "diningtable", "fridge"),
    "plate": ("cabinet", "countertop", "diningtable", "sinkbasin"),
    "bowl": ("cabinet", "countertop", "diningtable", "shelf", "sinkbasin"),
    "pan": ("stoveburner", "cabinet", "countertop", "sinkbasin"),
    "pot": ("stoveburner", "cabinet", "countertop", "sinkbasin"),
    "kettle": ("stoveburner", "countertop", "cabinet"),
    "knife": ("countertop", "drawer", "diningtable", "sinkbasin"),
    "butterknife": ("drawer", "countertop", "diningtable"),
    "fork": ("drawer", "countertop", "diningtable", "sinkbasin"),
    "spoon": ("drawer", "countertop", "diningtable", "sinkbasin"),
    "spatula": ("drawer", "countertop", "diningtable", "sinkbasin"),
    "ladle": ("drawer", "countertop", "diningtable", "sinkbasin"),
    "saltshaker": ("countertop", "cabinet", "diningtable", "shelf"),
    "peppershaker": ("countertop", "cabinet", "diningtable", "shelf"),
    "winebottle": ("fridge", "countertop", "cabinet", "diningtable"),
    "dishsponge": ("sinkbasin", "countertop", "cabinet", "drawer"),
    # bathroom
    "soapbar": ("sinkbasin", "countertop", "bathtubbasin", "cabinet", "toilet"),
    "soapbottle": ("countertop", "cabinet", "toilet", "shelf"),
    "spraybottle": ("cabinet", "toilet", "countertop", "garbagecan"),
    "toiletpaper": ("toiletpaperhanger", "toilet", "cabinet", "countertop"),
    "cloth": ("cabinet", "countertop", "bathtubbasin", "sinkbasin", "drawer"),
    "handtowel": ("handtowelholder", "towelholder", "countertop", "cabinet"),
    "candle": ("countertop", "shelf", "cabinet", "toilet"),
    "tissuebox": ("toilet", "countertop", "shelf", "cabinet"),
    "scrubbrush": ("toilet", "cabinet", "garbagecan"),
    # bedroom and living room
    "book": ("desk", "bed", "shelf", "sidetable", "coffeetable", "drawer"),
    "cellphone": ("bed", "desk", "sidetable", "dresser", "sofa", "drawer"),
    "keychain": ("sidetable", "dresser", "coffeetable", "drawer", "shelf"),
    "creditcard": ("drawer", "desk", "sidetable", "dresser", "coffeetable", "armchair"),
    "pen": ("desk", "drawer", "sidetable", "shelf"),
    "pencil": ("desk", "drawer", "sidetable", "shelf"),
    "cd": ("desk", "drawer", "shelf", "sidetable", "safe"),
    "alarmclock": ("desk", "sidetable", "dresser", "shelf"),
    "laptop": ("desk", "bed", "sofa", "coffeetable"),
    "pillow": ("bed", "sofa", "armchair"),
    "remotecontrol": ("coffeetable", "sofa", "sidetable", "armchair", "tvstand"),
    "statue": ("shelf", "coffeetable", "sidetable", "dresser"),
    "vase": ("shelf", "coffeetable", "sidetable", "tvstand"),
    "newspaper": ("sofa", "coffeetable", "sidetable", "armchair"),
    "watch": ("sidetable", "dresser", "desk", "drawer"),
    "box": ("shelf", "coffeetable", "dresser", "sofa"),
    LAMP: ("desk", "sidetable", "dresser"),
}
