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
the generator rejects tasks of the other split. Expected outputs come from the parts' reference
functions (:mod:`jf_ray.workloads.code_parts`), never from running generated code here; the body template is
checked against them by the tests.
Scoring executes prompt + completion + tests in :mod:`jf_ray.sandbox` (see :mod:`jf_ray.scoring`).
'''

from __future__ import annotations

import random
from dataclasses import dataclass, field

from jf_ray.workloads.code_parts import COUNT, INDENT, KINDS, PAIRS, REDUCTIONS, Kind, Part, Reduction
from jf_ray.workloads.common import Example, Split, draw_distinct

NUM_EXAMPLES, NUM_TESTS = 2, 5


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
