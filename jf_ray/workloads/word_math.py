"""The ``wordmath`` workload: short arithmetic word problems in ordinary English, for pretrained instruct models.

``math`` is written for the embedded ~1M-parameter model: one story shape and digit-by-digit solutions in a
fixed layout. A real instruct model (SmolLM2-135M-Instruct and up) has read word problems told the way a school
worksheet tells them, so these are one- and two-step problems in those phrasings: getting more, giving away,
groups of equal size, sharing equally, comparing, costs and totals, e.g. "Sam has 12 apples and buys 7 more.
How many apples does Sam have now?".

Each prompt ends with one sentence asking for a final line ``The answer is N.``: the form
:func:`jf_ray.workloads.math.final_answer` reads, so a reply is scored the way ``math`` is, by its final answer
exactly (no "last number in the reply" fallback, which would pass a reply cut off mid-way). The reference
solution is a sentence of working that ends the same way.

Split and determinism as for every generated workload (:func:`~jf_ray.workloads.common.draw_distinct`): a
hash of the prompt text decides its split, and ``(split, seed)`` decides the problems.
"""

from __future__ import annotations

import random

from jf_ray.workloads.common import Example, Split, draw_distinct

ANSWER_FORMAT = 'End your reply with "The answer is N." where N is the number.'
PEOPLE = (
    ("Sam", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Noah", "he"),
    ("Emma", "she"),
    ("Omar", "he"),
    ("Lena", "she"),
    ("Ravi", "he"),
    ("Zoe", "she"),
    ("Tom", "he"),
    ("Nina", "she"),
)
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "balloons")
CONTAINERS = ("bags", "boxes", "jars", "baskets", "packs")
PRICED = (("notebook", "notebooks"), ("toy car", "toy cars"), ("sandwich", "sandwiches"), ("ticket", "tickets"))
DAILY = (("reads", "pages"), ("runs", "laps"), ("writes", "lines"), ("picks", "flowers"))


def generate_word_math(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """``n`` distinct problems of ``split``, deterministic for ``(split, seed)``; the text decides the split."""
    return draw_distinct("wordmath", n, split, seed, _keyed_problem)


def _keyed_problem(rng: random.Random) -> tuple[str, Example]:
    example = draw_problem(rng)
    return example.prompt, example


def draw_problem(rng: random.Random) -> Example:
    """One problem of a random kind: the question plus the answer-format sentence, and its worked answer."""
    question, working, value = rng.choice(KINDS)(rng)
    return Example(prompt=f"{question} {ANSWER_FORMAT}", answer=f"{working} The answer is {value}.")


# Each kind draws its numbers and words and returns (question, one sentence of working, the answer).
def _more(rng: random.Random) -> tuple[str, str, int]:
    (name, _), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a, b = rng.randint(3, 40), rng.randint(2, 30)
    verb = rng.choice(("buys", "finds", "is given"))
    question = f"{name} has {a} {item} and {verb} {b} more. How many {item} does {name} have now?"
    return question, f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}.", a + b


def _give_away(rng: random.Random) -> tuple[str, str, int]:
    (name, pronoun), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a = rng.randint(8, 60)
    b = rng.randint(2, a - 2)
    question = (
        f"{name} had {a} {item}. {pronoun.capitalize()} gave {b} of them to a friend. "
        f"How many {item} does {name} have left?"
    )
    return question, f"{name} had {a} {item} and gave away {b}, so {a} - {b} = {a - b}.", a - b


def _groups(rng: random.Random) -> tuple[str, str, int]:
    (name, _), item, container = rng.choice(PEOPLE), rng.choice(ITEMS), rng.choice(CONTAINERS)
    groups, each = rng.randint(2, 9), rng.randint(2, 12)
    total = groups * each
    question = f"{name} has {groups} {container} with {each} {item} in each. How many {item} does {name} have in all?"
    return question, f"There are {groups} {container} of {each} {item}, so {groups} * {each} = {total}.", total


def _share(rng: random.Random) -> tuple[str, str, int]:
    (name, _), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    friends, each = rng.randint(2, 8), rng.randint(2, 10)
    total = friends * each
    question = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return question, f"{total} {item} shared by {friends} friends is {total} / {friends} = {each} each.", each


def _compare(rng: random.Random) -> tuple[str, str, int]:
    (name, _), (other, _) = rng.sample(PEOPLE, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(10, 50), rng.randint(2, 9)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item}. {other} has {b} more {item} than {name}. How many {item} does {other} have?"
        return question, f"{other} has {b} more than {a}, so {a} + {b} = {a + b}.", a + b
    question = f"{name} has {a} {item}. {other} has {b} fewer {item} than {name}. How many {item} does {other} have?"
    return question, f"{other} has {b} fewer than {a}, so {a} - {b} = {a - b}.", a - b


def _more_then_less(rng: random.Random) -> tuple[str, str, int]:
    (name, pronoun), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    question = (
        f"{name} has {a} {item}. {pronoun.capitalize()} buys {b} more and then gives {c} to a friend. "
        f"How many {item} does {name} have now?"
    )
    total = a + b - c
    working = f"After buying, {name} has {a} + {b} = {a + b} {item}; after giving {c} away, {a + b} - {c} = {total}."
    return question, working, total


def _cost(rng: random.Random) -> tuple[str, str, int]:
    (name, _), (one, many) = rng.choice(PEOPLE), rng.choice(PRICED)
    price, count = rng.randint(2, 12), rng.randint(2, 9)
    total = count * price
    question = f"A {one} costs {price} dollars. {name} buys {count} {many}. How many dollars does {name} spend?"
    return question, f"{count} {many} at {price} dollars each cost {count} * {price} = {total} dollars.", total


def _two_days(rng: random.Random) -> tuple[str, str, int]:
    (name, _), (verb, unit) = rng.choice(PEOPLE), rng.choice(DAILY)
    a, b = rng.randint(3, 40), rng.randint(3, 40)
    question = f"{name} {verb} {a} {unit} on Monday and {b} {unit} on Tuesday. How many {unit} is that in total?"
    return question, f"Over the two days that is {a} + {b} = {a + b} {unit}.", a + b


KINDS = (_more, _give_away, _groups, _share, _compare, _more_then_less, _cost, _two_days)
