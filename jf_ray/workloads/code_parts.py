"""The parts a :mod:`jf_ray.workloads.code` task is composed of: what it iterates over (a :class:`Kind` with its
filters and transformations) and how the kept items become the result (a :class:`Reduction`).

Each part carries its docstring words, its name words, its loop code and a reference function of its meaning;
expected outputs are computed from the reference functions, never by running generated code.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WORDS = tuple(
    "apple tree sun river code cat blue stone moon bird sky fish rain car leaf book star hat lamp road wind box door"
    " egg cup map".split()
)
LETTERS = "abcdefghlmnoprst"
SEPARATORS = ("-", ", ", " ", "+", "/", ":")
INDENT = "    "


def _no_constants(rng: random.Random) -> dict:
    return {}


def _number(low: int, high: int, key: str = "k") -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict:
        k = rng.randint(low, high)
        return {key: k, f"{key}w": NUMBER_WORDS[k]}

    return draw


def _letter(rng: random.Random) -> dict:
    return {"c": rng.choice(LETTERS)}


def _separator(rng: random.Random) -> dict:
    return {"sep": rng.choice(SEPARATORS)}


@dataclass(frozen=True)
class Part:
    """A filter or a transformation of one item: docstring words, name words, code, and its meaning."""

    phrase: str  # "are greater than {k}"; formatted with the part's constants
    slug: str  # "above_{kw}": part of the function name
    code: str  # "{v} > {k}", with {v} the loop variable
    apply: Callable  # (constants, item) -> bool for a filter, the new item for a transformation
    constants: Callable[[random.Random], dict] = _no_constants
    gives: str = ""  # a transformation's item type when it changes it ("int" from words' lengths)


@dataclass(frozen=True)
class Kind:
    """What a task iterates over."""

    arg_type: str
    arg_names: tuple[str, ...]
    var: str  # the loop variable
    noun: str  # "the numbers in {a}"
    item: str  # the item type: int | str
    filters: tuple[Part, ...]
    transforms: tuple[Part, ...]
    draw_input: Callable[[random.Random], object]


@dataclass(frozen=True)
class Reduction:
    """How the kept items become the result: its docstring words, name word, loop code and meaning."""

    phrase: str  # "Return the sum of {items}."
    slug: str
    init: tuple[str, ...]
    update: tuple[str, ...]  # lines with {v}: the kept (transformed) item
    result: str
    returns: str  # with {t}: the item type
    items: tuple[str, ...]  # item types it applies to
    apply: Callable  # (constants, kept items) -> result
    constants: Callable[[random.Random], dict] = _no_constants
    needs_filter: bool = False  # a count of every item is just len()
    pair_noun: str = ""  # "the count": its name inside a pair of results


INTS = Kind(
    "list[int]",
    ("nums", "values", "xs", "numbers"),
    "x",
    "the numbers in {a}",
    "int",
    (
        Part("are greater than {k}", "above_{kw}", "{v} > {k}", lambda c, x: x > c["k"], _number(1, 10)),
        Part("are less than {k}", "below_{kw}", "{v} < {k}", lambda c, x: x < c["k"], _number(1, 10)),
        Part(
            "are divisible by {k}", "multiples_of_{kw}", "{v} % {k} == 0", lambda c, x: x % c["k"] == 0, _number(2, 5)
        ),
        Part("are even", "even", "{v} % 2 == 0", lambda c, x: x % 2 == 0),
        Part("are odd", "odd", "{v} % 2 == 1", lambda c, x: x % 2 == 1),
        Part("are not equal to {k}", "not_{kw}", "{v} != {k}", lambda c, x: x != c["k"], _number(0, 10)),
    ),
    (
        Part("plus {m}", "plus_{mw}", "{v} + {m}", lambda c, x: x + c["m"], _number(1, 9, "m")),
        Part("times {m}", "times_{mw}", "{v} * {m}", lambda c, x: x * c["m"], _number(2, 9, "m")),
        Part("minus {m}", "minus_{mw}", "{v} - {m}", lambda c, x: x - c["m"], _number(1, 9, "m")),
        Part("squared", "squared", "{v} * {v}", lambda c, x: x * x),
    ),
    lambda rng: [rng.randint(0, 20) for _ in range(rng.randint(1, 6))],
)
WORD_LIST = Kind(
    "list[str]",
    ("words", "names", "items"),
    "w",
    "the words in {a}",
    "str",
    (
        Part(
            "have more than {k} letters",
            "longer_than_{kw}",
            "len({v}) > {k}",
            lambda c, w: len(w) > c["k"],
            _number(2, 4),
        ),
        Part(
            'start with "{c}"', "starting_with_{c}", '{v}.startswith("{c}")', lambda c, w: w.startswith(c["c"]), _letter
        ),
        Part('end with "{c}"', "ending_with_{c}", '{v}.endswith("{c}")', lambda c, w: w.endswith(c["c"]), _letter),
        Part('contain "{c}"', "with_{c}", '"{c}" in {v}', lambda c, w: c["c"] in w, _letter),
    ),
    (
        Part("in upper case", "upper", "{v}.upper()", lambda c, w: w.upper()),
        Part("reversed", "reversed", "{v}[::-1]", lambda c, w: w[::-1]),
        Part("replaced by its length", "lengths", "len({v})", lambda c, w: len(w), gives="int"),
    ),
    lambda rng: [rng.choice(WORDS) for _ in range(rng.randint(1, 5))],
)
TEXT = Kind(
    "str",
    ("s", "text"),
    "ch",
    "the characters of {a}",
    "str",
    (
        Part("are vowels", "vowels", '{v} in "aeiou"', lambda c, ch: ch in "aeiou"),
        Part("are not spaces", "no_spaces", '{v} != " "', lambda c, ch: ch != " "),
        Part('are "{c}"', "letter_{c}", '{v} == "{c}"', lambda c, ch: ch == c["c"], _letter),
        Part('are not "{c}"', "without_{c}", '{v} != "{c}"', lambda c, ch: ch != c["c"], _letter),
    ),
    (Part("in upper case", "upper", "{v}.upper()", lambda c, ch: ch.upper()),),
    lambda rng: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))),
)
KINDS = (INTS, INTS, WORD_LIST, TEXT)  # numbers twice as often: most of HumanEval's arithmetic


def _largest(values: list):
    return max(values) if values else None


def _smallest(values: list):
    return min(values) if values else None


def _product(values: list) -> int:
    result = 1
    for value in values:
        result *= value
    return result


LIST = Reduction(
    "Return a list of {items}.",
    "list",
    ("result = []",),
    ("result.append({v})",),
    "result",
    "list[{t}]",
    ("int", "str"),
    lambda c, vs: list(vs),
    pair_noun="the list",
)
SUM = Reduction(
    "Return the sum of {items}.",
    "sum",
    ("total = 0",),
    ("total += {v}",),
    "total",
    "int",
    ("int",),
    lambda c, vs: sum(vs),
    pair_noun="the sum",
)
COUNT = Reduction(
    "Count {items}.",
    "count",
    ("count = 0",),
    ("count += 1",),
    "count",
    "int",
    ("int", "str"),
    lambda c, vs: len(vs),
    needs_filter=True,
    pair_noun="the count",
)
REDUCTIONS = (
    LIST,
    SUM,
    COUNT,
    Reduction(
        "Return the product of {items}.",
        "product",
        ("product = 1",),
        ("product *= {v}",),
        "product",
        "int",
        ("int",),
        lambda c, vs: _product(vs),
    ),
    Reduction(
        "Return the largest of {items}, or None if there is none.",
        "largest",
        ("best = None",),
        ("if best is None or {v} > best:", "    best = {v}"),
        "best",
        "{t} | None",
        ("int",),
        lambda c, vs: _largest(vs),
    ),
    Reduction(
        "Return the smallest of {items}, or None if there is none.",
        "smallest",
        ("best = None",),
        ("if best is None or {v} < best:", "    best = {v}"),
        "best",
        "{t} | None",
        ("int",),
        lambda c, vs: _smallest(vs),
    ),
    Reduction(
        'Return {items}, joined by "{sep}".',
        "join",
        ("parts = []",),
        ("parts.append({v})",),
        '"{sep}".join(parts)',
        "str",
        ("str",),
        lambda c, vs: c["sep"].join(vs),
        _separator,
    ),
    Reduction(
        "Return {items}, joined into one string.",
        "concat",
        ('result = ""',),
        ("result += {v}",),
        "result",
        "str",
        ("str",),
        lambda c, vs: "".join(vs),
    ),
)
PAIRS = ((COUNT, SUM), (SUM, COUNT), (COUNT, LIST))  # two results of one loop, returned as a tuple
