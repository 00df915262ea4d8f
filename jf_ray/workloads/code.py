'''The ``code`` workload: generated Python tasks shaped like HumanEval/MBPP, scored by running hidden tests.

A task is a function signature and a docstring with two examples (the prompt); the reference answer is a
multi-line body; hidden tests (``def check(candidate): assert ...``, HumanEval's layout) call the function
on other inputs. Every task composes three parts over a list of numbers, a list of words or the characters
of a string: an optional filter, an optional transformation and a reduction (a list, a sum, a count, a
product, the largest or smallest value, a joined string, or two of them as a tuple), with random constants,
argument names and phrasings, for example::

    def sum_even_times_three(nums: list[int]) -> int:
        """Return the sum of the numbers in nums that are even, each times 3.
        >>> sum_even_times_three([4, 7, 10])
        42
        ...
        """
        total = 0
        for x in nums:
            if x % 2 == 0:
                value = x * 3
                total += value
        return total

The bodies are written out as loops, several statements long (30-60 tokens), so that decoding them in
parallel has room to gain, as on HumanEval, where canonical solutions run to several lines.

Split: by a hash of the task without its examples (signature and description, constants included), so a
held-out task's specification never appears in training data, whatever the seed; as in the math workload
the generator rejects tasks of the other split. Expected outputs come from reference functions in this
module, never from running generated code here; the body template is checked against them by the tests.
Scoring executes prompt + completion + tests in :mod:`jf_ray.sandbox` (see :mod:`jf_ray.scoring`).
'''

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from jf_ray.workloads.common import Example, Split, draw_distinct

NUM_EXAMPLES, NUM_TESTS = 2, 5
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


@dataclass(frozen=True)
class Task:
    kind: Kind
    reductions: tuple[Reduction, ...]
    filter: Part | None
    transform: Part | None
    constants: dict = field(default_factory=dict)

    @property
    def item_type(self) -> str:
        return _item_type(self.kind, self.transform)

    def description(self, arg: str) -> str:
        items = self.kind.noun.format(a=arg)
        if self.filter:
            items += f" that {self.filter.phrase}"
        if self.transform:
            items += f", each {self.transform.phrase}"
        items = items.format(**self.constants)
        if len(self.reductions) == 2:
            first, second = self.reductions
            return f"Return {first.pair_noun} and {second.pair_noun} of {items}."
        return self.reductions[0].phrase.format(items=items, **self.constants)

    def name(self) -> str:
        parts = ["_and_".join(r.slug for r in self.reductions)]
        parts += [p.slug for p in (self.filter, self.transform) if p]
        return "_".join(parts).format(**self.constants)

    def returns(self) -> str:
        types = [r.returns.format(t=self.item_type) for r in self.reductions]
        return f"tuple[{', '.join(types)}]" if len(types) == 2 else types[0]

    def body(self, arg: str) -> str:
        """The reference body: one loop that filters, transforms and reduces, written out statement by statement."""
        fields = {**self.constants, "v": self.kind.var}
        lines = [line for r in self.reductions for line in r.init]
        lines.append(f"for {self.kind.var} in {arg}:")
        depth = 1
        if self.filter:
            lines.append(INDENT + f"if {self.filter.code.format(**fields)}:")
            depth = 2
        value = self.kind.var
        if self.transform:
            lines.append(INDENT * depth + f"value = {self.transform.code.format(**fields)}")
            value = "value"
        for reduction in self.reductions:
            lines += [INDENT * depth + line.replace("{v}", value) for line in reduction.update]
        results = ", ".join(r.result for r in self.reductions).format(**self.constants)
        lines.append(f"return {results}")
        return "".join(f"{INDENT}{line}\n" for line in lines)

    def expected(self, items) -> object:
        kept = [x for x in items if not self.filter or self.filter.apply(self.constants, x)]
        if self.transform:
            kept = [self.transform.apply(self.constants, x) for x in kept]
        results = tuple(r.apply(self.constants, kept) for r in self.reductions)
        return results if len(results) == 2 else results[0]


def generate_code(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """``n`` distinct tasks of ``split``, deterministic for ``(split, seed)``; the specification decides the split."""
    return draw_distinct("code", n, split, seed, draw_task)


def draw_task(rng: random.Random) -> tuple[str, Example]:
    """One random task: (its specification without examples, the example with prompt, body and tests)."""
    task = _draw_composition(rng)
    arg = rng.choice(task.kind.arg_names)
    name = task.name()
    signature = f"def {name}({arg}: {task.kind.arg_type}) -> {task.returns()}:\n"
    description = task.description(arg)
    calls = [(repr(case), task.expected(case)) for case in _distinct_inputs(rng, task.kind)]
    examples = "".join(f"    >>> {name}({call})\n    {result!r}\n" for call, result in calls[:NUM_EXAMPLES])
    prompt = f'{signature}    """{description}\n{examples}    """\n'
    tests = "def check(candidate):\n" + "".join(
        f"    assert candidate({c}) == {r!r}\n" for c, r in calls[NUM_EXAMPLES:]
    )
    example = Example(prompt=prompt, answer=task.body(arg), tests=tests, entry_point=name)
    return signature + description, example


def _item_type(kind: Kind, transform: Part | None) -> str:
    """The type of the items a reduction sees: the kind's, or what the transformation makes of them."""
    return (transform.gives or kind.item) if transform else kind.item


def _distinct_inputs(rng: random.Random, kind: Kind, tries: int = 100) -> list:
    """Inputs for the examples and the tests, all different where the input space allows."""
    cases: list = []
    for _ in range(tries):
        case = kind.draw_input(rng)
        if case not in cases:
            cases.append(case)
        if len(cases) == NUM_EXAMPLES + NUM_TESTS:
            return cases
    raise RuntimeError("could not draw distinct inputs")  # the kinds' input spaces are far larger


def _draw_composition(rng: random.Random) -> Task:
    """A kind, then a filter (three times in four), a transformation (half the time), then a reduction or a
    pair of them that fits the items the transformation leaves."""
    kind = rng.choice(KINDS)
    filter_ = rng.choice(kind.filters) if rng.random() < 0.75 else None
    transform = rng.choice(kind.transforms) if rng.random() < 0.5 else None
    item = _item_type(kind, transform)
    options = [(r,) for r in REDUCTIONS if item in r.items] + [p for p in PAIRS if all(item in r.items for r in p)]
    options = [rs for rs in options if filter_ or not any(r.needs_filter for r in rs)]
    if transform:  # a count alone would leave the transformed value unused
        options = [rs for rs in options if rs != (COUNT,)]
    reductions = rng.choice(options)
    constants: dict = {}
    for part in (filter_, transform, *reductions):
        if part:
            constants.update(part.constants(rng))
    return Task(kind, reductions, filter_, transform, constants)
