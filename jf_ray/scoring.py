"""The one quality scorer: how good decoded outputs are, for ``jf-ray eval`` and the job alike.

What is checked follows the examples, not who asks:

* examples with hidden tests (the ``code`` workload, HumanEval, user sets with ``tests``) are executed: the
  program ``prompt + completion + tests + check(entry_point)`` runs in :mod:`jf_ray.sandbox`, never here;
  the fraction that passes is ``pass_at_1`` (one greedy or sampled completion per task);
* examples with reference answers (``math``, ``wordmath``, user sets with ``answer``) pass when the final answer (``The
  answer is N``, ``#### N`` or ``\\boxed{N}``) equals the reference's, or, where the reference states none,
  when the whitespace-normalised texts are equal; the fraction is ``accuracy``;
* ``stdlib`` (a language-modelling set) has no pass/fail; its quality is the loss of the reference bodies,
  which needs the model (:func:`jf_ray.evaluation.answer_loss`).

Every score has ``n`` and ``correct`` (how many passed) beside its rate, and the rate's Wilson 95% interval
(``ci_low``, ``ci_high``): a 164-problem pass@1 of 0.30 is 0.23-0.37, so rounds are read against the base's
interval, not its point. Speed and ``repetition`` come from
:func:`jf_ray.bench.decoders.summarize`, beside these fields in every report row. See docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from jf_ray.sandbox import SandboxLimits, execute_many
from jf_ray.workloads.common import Example
from jf_ray.workloads.math import final_answer

# Every quality field a report row may carry, with its column label: the one list (report tables, job rows,
# `jf-ray eval`'s summary line read it).
QUALITY_FIELDS = {"pass_at_1": "pass@1", "accuracy": "accuracy", "loss": "loss"}
Z_95 = 1.959963984540054  # the standard normal quantile of 0.975: a two-sided 95% interval
NUM_SAMPLES = 3  # decoded examples kept in a report, for a human to eyeball
_FENCE_RE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def score_outputs(
    examples: Sequence[Example],
    texts: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    verdicts: dict[str, bool] | None = None,
) -> dict:
    """``n``, ``correct`` and ``pass_at_1`` (executed) or ``accuracy`` (answers), and a few ``samples``.

    A set mixing executed and answer-checked examples is refused: one rate means one thing. ``verdicts``
    (program -> passed), shared between calls, runs each distinct program once: greedy decoders agree."""
    if len(examples) != len(texts):
        raise ValueError(f"{len(examples)} examples but {len(texts)} outputs")
    executed = [bool(ex.tests) for ex in examples]
    if any(executed) and not all(executed):
        raise ValueError("examples mix hidden tests and reference answers; score them as two sets")
    passed = judge(examples, texts, limits, verdicts)
    metric = "pass_at_1" if executed and executed[0] else "accuracy"
    score = {"n": len(examples), metric: round(sum(passed) / len(examples), 4) if examples else 0.0}
    score["correct"] = sum(passed)
    score["ci_low"], score["ci_high"] = (round(bound, 4) for bound in wilson_interval(sum(passed), len(examples)))
    score["samples"] = [
        {"prompt": ex.prompt, "output": text, "correct": ok}
        for ex, text, ok in list(zip(examples, texts, passed))[:NUM_SAMPLES]
    ]
    return score


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a success rate ``successes / n`` (95% by default).

    Chosen over the normal approximation, which collapses to a zero-width interval at 0% or 100% and leaves
    [0, 1] for small ``n``: a base model that solves none of 20 problems still has an upper bound (0.16).
    With no trials nothing is known: (0, 1).
    """
    if n == 0:
        return 0.0, 1.0
    rate, spread = successes / n, z * z / n
    center = (rate + spread / 2) / (1 + spread)
    half = z / (1 + spread) * math.sqrt(rate * (1 - rate) / n + spread / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


def judge(
    examples: Sequence[Example],
    texts: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    verdicts: dict[str, bool] | None = None,
) -> list[bool]:
    """Per example: did its output pass (tests run in the sandbox, or the answer matched)?"""
    verdicts = {} if verdicts is None else verdicts
    programs = [program_for(ex, text) if ex.tests else None for ex, text in zip(examples, texts)]
    to_run = sorted({p for p in programs if p is not None and p not in verdicts})
    for program, result in zip(to_run, execute_many(to_run, limits)):
        verdicts[program] = result.passed
    return [
        verdicts[program] if program is not None else answer_matches(ex.answer, text)
        for ex, text, program in zip(examples, texts, programs)
    ]


def answer_matches(reference: str, text: str) -> bool:
    expected = final_answer(reference)
    if expected is not None:
        return final_answer(text) == expected
    return " ".join(reference.split()) == " ".join(text.split())


def extract_code(text: str) -> str:
    """The code in a reply: the first fenced block if the model wrote Markdown, else the text as is."""
    match = _FENCE_RE.search(text)
    return match.group(1) if match else text


def program_for(example: Example, text: str) -> str:
    """The program that decides ``example``: its prompt, the completion, its tests and the call of ``check``.

    The prompt comes first even when the completion repeats the whole function (what chat models do): the
    completion's definition then replaces the docstring-only one, and the prompt's imports and helpers stay.
    """
    completion = extract_code(text)
    if not completion.endswith("\n"):
        completion += "\n"
    return f"{example.prompt}{completion}\n\n{example.tests}\n\ncheck({example.entry_point})\n"
