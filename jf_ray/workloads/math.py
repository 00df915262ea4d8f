"""The ``math`` workload: generated multi-step arithmetic word problems with step-by-step solutions.

Each problem follows one person's stock of items through two or three events (finding more, giving some
away, buying boxes of them, doubling). The solution computes event by event, works additions and
subtractions digit by digit (:func:`column`), and ends with ``The answer is N.`` so that a decoder's output
can be checked exactly.

Numbers are kept small (see the difficulty knobs below) so that a ~1M-parameter model learns the arithmetic
in minutes of CPU; the tokenizer splits numbers into single digits.

Split: a problem belongs to ``heldout`` when a hash of its text falls in the held-out share, otherwise to
``train``. The generator rejects problems of the other split, so any seed draws fresh problems of the asked
split, and a held-out problem can never appear in training data, whatever seeds were used.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from jf_ray.workloads.common import Example, Split, draw_distinct

# Difficulty knobs: values stay at most MAX_VALUE, added/removed amounts at most MAX_AMOUNT, factors are
# single-digit. Division is left out: its facts are many and each is seen rarely in minutes of training.
MAX_VALUE = 99
MAX_START = 40
MAX_AMOUNT = 30
MAX_FACTOR = 9
MIN_EVENTS, MAX_EVENTS = 2, 3

NAMES = (
    "Ava",
    "Ben",
    "Cara",
    "Dan",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Uma",
    "Vic",
    "Wes",
    "Yara",
    "Zoe",
)
ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "pencils",
    "cookies",
    "cards",
    "shells",
    "stamps",
    "buttons",
    "beads",
    "candles",
    "eggs",
    "plums",
    "toys",
    "rocks",
    "ribbons",
    "cups",
    "seeds",
)
CONTAINERS = ("boxes", "bags", "packs", "jars", "crates", "baskets")

# "The answer is N" (our format), "#### N" (GSM8K) or "\boxed{N}" (what math-tuned chat models write).
_ANSWER_RE = re.compile(r"(?:answer is:?|####|\\boxed\{)\s*\$?\s*(-?\d[\d,]*)")


def generate_math(n: int, split: Split = "train", seed: int = 0) -> list[Example]:
    """``n`` distinct problems of ``split``, deterministic for ``(split, seed)``; the text decides the split."""
    return draw_distinct("math", n, split, seed, _keyed_problem)


def _keyed_problem(rng: random.Random) -> tuple[str, Example]:
    example = draw_problem(rng)
    return example.prompt, example


def draw_problem(rng: random.Random) -> Example:
    """One random problem: a start quantity, 2-3 events, a question; the solution computes line by line."""
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    value = rng.randint(2, MAX_START)
    story = [f"{name} has {value} {item}."]
    solution = [f"{name} starts with {value} {item}."]
    num_events = rng.randint(MIN_EVENTS, MAX_EVENTS)
    for _ in range(num_events):
        event = rng.choice(_possible_events(value))
        value = event(rng, value, name, friend, item, story, solution)
    story.append(f"How many {item} does {name} have now?")
    solution.append(f"The answer is {value}.")
    return Example(prompt=" ".join(story), answer="\n".join(solution))


def column(a: int, op: str, b: int) -> str:
    """``a op b`` (both below 100) worked digit by digit, the way it is done on paper.

    ``45 + 17: 5 + 7 = 12, carry 1; 4 + 1 + 1 = 6; so 62``. Every generated digit is then a one-digit fact
    about tokens a few positions back, which a small model learns many times faster than whole-number sums.
    The layout is the same for every pair (a missing tens digit is written as 0).
    """
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        ones, carry = ua + ub, int(ua + ub >= 10)
        first = f"{ua} + {ub} = {ones}" + (", carry 1" if carry else "")
        tens = ta + tb + carry
        second = f"{ta} + {tb}" + (" + 1" if carry else "") + f" = {tens}"
        result = a + b
    else:
        borrow = int(ua < ub)
        ones = ua + 10 * borrow - ub
        first = f"{ua + 10 * borrow} - {ub} = {ones}" + (", borrow 1" if borrow else "")
        tens = ta - tb - borrow
        second = f"{ta} - {tb}" + (" - 1" if borrow else "") + f" = {tens}"
        result = a - b
    assert 0 <= tens <= 9 and result == 10 * tens + ones % 10, (a, op, b)
    return f"{a} {op} {b}: {first}; {second}; so {result}"


# Each event appends its sentence to ``story`` and its computation(s) to ``solution``; returns the new value.
def _find_more(rng, value, name, friend, item, story, solution) -> int:
    k = rng.randint(2, min(MAX_AMOUNT, MAX_VALUE - value))
    story.append(f"Then {name} finds {k} more {item}.")
    solution.append(f"Finding {k} more: {column(value, '+', k)}.")
    return value + k


def _give_away(rng, value, name, friend, item, story, solution) -> int:
    k = rng.randint(1, min(MAX_AMOUNT, value - 1))
    story.append(f"Then {name} gives {k} {item} to {friend}.")
    solution.append(f"Giving {k} away: {column(value, '-', k)}.")
    return value - k


def _buy_boxes(rng, value, name, friend, item, story, solution) -> int:
    boxes = rng.randint(2, MAX_FACTOR)
    per_box = rng.randint(2, min(MAX_FACTOR, (MAX_VALUE - value) // boxes))
    container = rng.choice(CONTAINERS)
    bought = boxes * per_box
    story.append(f"Then {name} buys {boxes} {container} with {per_box} {item} in each.")
    solution.append(f"The {container} hold {boxes} * {per_box} = {bought} {item}.")
    solution.append(f"Buying {bought}: {column(value, '+', bought)}.")
    return value + bought


def _double(rng, value, name, friend, item, story, solution) -> int:
    story.append(f"Then {name} doubles the number of {item}.")
    solution.append(f"Doubling: {column(value, '+', value)}.")
    return value * 2


def _possible_events(value: int) -> list[Callable[..., int]]:
    room = MAX_VALUE - value
    events: list[Callable[..., int]] = [_give_away] if value >= 2 else []
    if room >= 2:
        events.append(_find_more)
    if room >= MAX_FACTOR * 2:
        events.append(_buy_boxes)
    if 2 * value <= MAX_VALUE:
        events.append(_double)
    return events


def final_answer(text: str) -> int | None:
    """The last final answer stated in ``text``, or None.

    There is no fallback to "the last number": a solution cut off mid-way must not pass because its last
    intermediate result happens to equal the answer.
    """
    candidates = _ANSWER_RE.findall(text)
    if not candidates:
        return None
    return int(candidates[-1].replace(",", ""))


def is_correct(generated: str, reference_answer: str) -> bool:
    """Exact check of the final answer of ``generated`` against the reference solution's."""
    expected = final_answer(reference_answer)
    return expected is not None and final_answer(generated) == expected
