'''The ``code`` workload: generated Python tasks shaped like HumanEval/MBPP, scored by running hidden tests.

A task is a function signature and a docstring with two examples (the prompt); the reference answer is the
body; hidden tests (``def check(candidate): assert ...``, HumanEval's layout) call the function on other
inputs. Tasks come from a few dozen families (list and string transformations, filtering, counting, small
arithmetic) with random constants, names and phrasings, for example::

    def keep_above_seven(nums: list[int]) -> list[int]:
        """Return the numbers in nums that are greater than 7.
        >>> keep_above_seven([3, 9, 12])
        [9, 12]
        ...
        """
        return [x for x in nums if x > 7]

Split: by a hash of the task without its examples (family, phrasing, names and constants), so a held-out
task's specification never appears in training data, whatever the seed; as in the math workload the
generator rejects tasks of the other split. Expected outputs come from a reference implementation in this
module, never from running generated code here; the body template is checked against them by the tests.
Scoring executes prompt + completion + tests in :mod:`jf_ray.sandbox` (see :mod:`jf_ray.scoring`).
'''

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from jf_ray.workloads.common import Example, Split, draw_distinct

NUM_EXAMPLES, NUM_TESTS = 2, 5
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WORDS = tuple(
    "apple tree sun river code cat blue stone moon bird sky fish rain car leaf book star hat lamp road wind box door"
    " egg cup map".split()
)
LETTERS = "abcdefghlmnoprst"
SEPARATORS = ("-", ", ", " ", "+", "/", ":")
ARG_NAMES = {"ints": ("nums", "values", "xs", "numbers"), "words": ("words", "names", "items"), "text": ("s", "text")}
ARG_TYPES = {"ints": "list[int]", "words": "list[str]", "text": "str"}


@dataclass(frozen=True)
class Family:
    kind: str  # ints | words | text | pair: the argument(s)
    names: tuple[str, ...]  # function-name templates
    docs: tuple[str, ...]  # first docstring line templates
    body: str  # reference body (one return statement)
    returns: str
    reference: Callable  # (constants, *inputs) -> expected output
    constants: Callable[[random.Random], dict] = lambda rng: {}


def _k(low: int, high: int) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict:
        k = rng.randint(low, high)
        return {"k": k, "w": NUMBER_WORDS[k]}

    return draw


def _letter(rng: random.Random) -> dict:
    return {"c": rng.choice(LETTERS)}


def _two_letters(rng: random.Random) -> dict:
    c, d = rng.sample(LETTERS, 2)
    return {"c": c, "d": d}


def _sep(rng: random.Random) -> dict:
    return {"sep": rng.choice(SEPARATORS)}


FAMILIES: tuple[Family, ...] = (
    Family(
        "ints",
        ("add_{w}", "increase_by_{w}"),
        (
            "Return a list with {k} added to every number in {a}.",
            "Add {k} to each element of {a} and return the new list.",
        ),
        "return [x + {k} for x in {a}]",
        "list[int]",
        lambda c, xs: [x + c["k"] for x in xs],
        _k(1, 9),
    ),
    Family(
        "ints",
        ("multiply_by_{w}", "scale_by_{w}"),
        ("Return a list with every number in {a} multiplied by {k}.", "Multiply each element of {a} by {k}."),
        "return [x * {k} for x in {a}]",
        "list[int]",
        lambda c, xs: [x * c["k"] for x in xs],
        _k(2, 9),
    ),
    Family(
        "ints",
        ("keep_above_{w}", "greater_than_{w}"),
        ("Return the numbers in {a} that are greater than {k}.", "Keep only the elements of {a} above {k}."),
        "return [x for x in {a} if x > {k}]",
        "list[int]",
        lambda c, xs: [x for x in xs if x > c["k"]],
        _k(1, 10),
    ),
    Family(
        "ints",
        ("keep_below_{w}", "less_than_{w}"),
        ("Return the numbers in {a} that are less than {k}.", "Keep only the elements of {a} below {k}."),
        "return [x for x in {a} if x < {k}]",
        "list[int]",
        lambda c, xs: [x for x in xs if x < c["k"]],
        _k(1, 10),
    ),
    Family(
        "ints",
        ("count_above_{w}", "how_many_over_{w}"),
        ("Count the numbers in {a} that are greater than {k}.", "Return how many elements of {a} are above {k}."),
        "return sum(1 for x in {a} if x > {k})",
        "int",
        lambda c, xs: sum(x > c["k"] for x in xs),
        _k(1, 10),
    ),
    Family(
        "ints",
        ("count_{w}s", "occurrences_of_{w}"),
        ("Count how many times {k} appears in {a}.", "Return the number of elements of {a} equal to {k}."),
        "return {a}.count({k})",
        "int",
        lambda c, xs: xs.count(c["k"]),
        _k(0, 9),
    ),
    Family(
        "ints",
        ("multiples_of_{w}", "divisible_by_{w}"),
        ("Return the numbers in {a} that are divisible by {k}.", "Keep only the multiples of {k} in {a}."),
        "return [x for x in {a} if x % {k} == 0]",
        "list[int]",
        lambda c, xs: [x for x in xs if x % c["k"] == 0],
        _k(2, 5),
    ),
    Family(
        "ints",
        ("total", "sum_all"),
        ("Return the sum of the numbers in {a}.", "Add up all elements of {a}."),
        "return sum({a})",
        "int",
        lambda c, xs: sum(xs),
    ),
    Family(
        "ints",
        ("sum_of_squares", "square_sum"),
        ("Return the sum of the squares of the numbers in {a}.", "Square each element of {a} and add them up."),
        "return sum(x * x for x in {a})",
        "int",
        lambda c, xs: sum(x * x for x in xs),
    ),
    Family(
        "ints",
        ("largest", "maximum"),
        ("Return the largest number in {a}.", "Find the maximum element of {a}."),
        "return max({a})",
        "int",
        lambda c, xs: max(xs),
    ),
    Family(
        "ints",
        ("smallest", "minimum"),
        ("Return the smallest number in {a}.", "Find the minimum element of {a}."),
        "return min({a})",
        "int",
        lambda c, xs: min(xs),
    ),
    Family(
        "ints",
        ("first_{w}", "take_{w}"),
        ("Return the first {k} elements of {a}.", "Take the first {k} numbers of {a}."),
        "return {a}[:{k}]",
        "list[int]",
        lambda c, xs: xs[: c["k"]],
        _k(1, 4),
    ),
    Family(
        "ints",
        ("last_{w}", "tail_{w}"),
        ("Return the last {k} elements of {a}.", "Take the last {k} numbers of {a}."),
        "return {a}[-{k}:]",
        "list[int]",
        lambda c, xs: xs[-c["k"] :],
        _k(1, 4),
    ),
    Family(
        "ints",
        ("reverse_list", "reversed_numbers"),
        ("Return the elements of {a} in reverse order.", "Reverse the list {a}."),
        "return {a}[::-1]",
        "list[int]",
        lambda c, xs: xs[::-1],
    ),
    Family(
        "ints",
        ("sort_ascending", "sorted_numbers"),
        ("Return the numbers in {a} sorted from smallest to largest.", "Sort {a} in increasing order."),
        "return sorted({a})",
        "list[int]",
        lambda c, xs: sorted(xs),
    ),
    Family(
        "ints",
        ("sort_descending", "largest_first"),
        ("Return the numbers in {a} sorted from largest to smallest.", "Sort {a} in decreasing order."),
        "return sorted({a}, reverse=True)",
        "list[int]",
        lambda c, xs: sorted(xs, reverse=True),
    ),
    Family(
        "words",
        ("longer_than_{w}", "long_words_{w}"),
        ("Return the words in {a} with more than {k} letters.", "Keep only the strings of {a} longer than {k}."),
        "return [w for w in {a} if len(w) > {k}]",
        "list[str]",
        lambda c, ws: [w for w in ws if len(w) > c["k"]],
        _k(2, 4),
    ),
    Family(
        "words",
        ("starting_with_{c}", "begins_with_{c}"),
        ('Return the words in {a} that start with "{c}".', 'Keep only the strings of {a} beginning with "{c}".'),
        'return [w for w in {a} if w.startswith("{c}")]',
        "list[str]",
        lambda c, ws: [w for w in ws if w.startswith(c["c"])],
        _letter,
    ),
    Family(
        "words",
        ("join_words", "glue_words"),
        ('Join the words in {a} with "{sep}" between them.', 'Return the strings of {a} joined by "{sep}".'),
        'return "{sep}".join({a})',
        "str",
        lambda c, ws: c["sep"].join(ws),
        _sep,
    ),
    Family(
        "words",
        ("upper_words", "shout_all"),
        ("Return the words in {a} in upper case.", "Convert every string of {a} to capital letters."),
        "return [w.upper() for w in {a}]",
        "list[str]",
        lambda c, ws: [w.upper() for w in ws],
    ),
    Family(
        "words",
        ("word_lengths", "lengths"),
        ("Return the length of each word in {a}.", "Return a list with the number of letters of every string in {a}."),
        "return [len(w) for w in {a}]",
        "list[int]",
        lambda c, ws: [len(w) for w in ws],
    ),
    Family(
        "text",
        ("count_{c}", "number_of_{c}"),
        ('Count how many times the letter "{c}" appears in {a}.', 'Return the number of "{c}" characters in {a}.'),
        'return {a}.count("{c}")',
        "int",
        lambda c, s: s.count(c["c"]),
        _letter,
    ),
    Family(
        "text",
        ("replace_{c}_with_{d}", "swap_{c}_for_{d}"),
        ('Return {a} with every "{c}" replaced by "{d}".', 'Replace each letter "{c}" in {a} with "{d}".'),
        'return {a}.replace("{c}", "{d}")',
        "str",
        lambda c, s: s.replace(c["c"], c["d"]),
        _two_letters,
    ),
    Family(
        "text",
        ("reverse_text", "backwards"),
        ("Return {a} reversed.", "Return the characters of {a} in reverse order."),
        "return {a}[::-1]",
        "str",
        lambda c, s: s[::-1],
    ),
    Family(
        "text",
        ("to_upper", "capitalize_all"),
        ("Return {a} in upper case.", "Convert every letter of {a} to a capital letter."),
        "return {a}.upper()",
        "str",
        lambda c, s: s.upper(),
    ),
    Family(
        "text",
        ("repeat_{w}_times", "times_{w}"),
        ("Return {a} repeated {k} times.", "Return {k} copies of {a} joined together."),
        "return {a} * {k}",
        "str",
        lambda c, s: s * c["k"],
        _k(2, 4),
    ),
    Family(
        "pair",
        ("times_{w}_plus", "scale_and_add"),
        ("Return {a} multiplied by {k}, plus {b}.", "Multiply {a} by {k} and add {b}."),
        "return {a} * {k} + {b}",
        "int",
        lambda c, x, y: x * c["k"] + y,
        _k(2, 9),
    ),
    Family(
        "pair",
        ("sum_times_{w}", "add_then_scale"),
        ("Return the sum of {a} and {b}, multiplied by {k}.", "Add {a} and {b}, then multiply by {k}."),
        "return ({a} + {b}) * {k}",
        "int",
        lambda c, x, y: (x + y) * c["k"],
        _k(2, 9),
    ),
    Family(
        "pair",
        ("difference_plus_{w}", "subtract_and_add"),
        ("Return {a} minus {b}, plus {k}.", "Subtract {b} from {a} and add {k}."),
        "return {a} - {b} + {k}",
        "int",
        lambda c, x, y: x - y + c["k"],
        _k(1, 9),
    ),
)


def generate_code(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """``n`` distinct tasks of ``split``, deterministic for ``(split, seed)``; the specification decides the split."""
    return draw_distinct("code", n, split, seed, draw_task)


def draw_task(rng: random.Random) -> tuple[str, Example]:
    """One random task: (its specification without examples, the example with prompt, body and tests)."""
    family = rng.choice(FAMILIES)
    constants = family.constants(rng)
    name = rng.choice(family.names).format(**constants)
    args = ("a", "b") if family.kind == "pair" else (rng.choice(ARG_NAMES[family.kind]),)
    if family.kind == "pair" and rng.random() < 0.5:
        args = ("x", "y")
    fields = {**constants, "a": args[0], "b": args[-1]}
    params = (
        ", ".join(f"{arg}: int" for arg in args) if family.kind == "pair" else f"{args[0]}: {ARG_TYPES[family.kind]}"
    )
    signature = f"def {name}({params}) -> {family.returns}:\n"
    description = rng.choice(family.docs).format(**fields)
    spec = signature + description
    cases = [_draw_input(rng, family.kind) for _ in range(NUM_EXAMPLES + NUM_TESTS)]
    calls = [(", ".join(map(repr, case)), family.reference(constants, *case)) for case in cases]
    examples = "".join(f"    >>> {name}({call})\n    {result!r}\n" for call, result in calls[:NUM_EXAMPLES])
    prompt = f'{signature}    """{description}\n{examples}    """\n'
    tests = "def check(candidate):\n" + "".join(
        f"    assert candidate({c}) == {r!r}\n" for c, r in calls[NUM_EXAMPLES:]
    )
    answer = f"    {family.body.format(**fields)}\n"
    return spec, Example(prompt=prompt, answer=answer, tests=tests, entry_point=name)


def _draw_input(rng: random.Random, kind: str) -> tuple:
    if kind == "ints":
        return ([rng.randint(0, 20) for _ in range(rng.randint(1, 6))],)
    if kind == "words":
        return ([rng.choice(WORDS) for _ in range(rng.randint(1, 5))],)
    if kind == "text":
        return (" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))),)
    return rng.randint(0, 20), rng.randint(0, 20)
