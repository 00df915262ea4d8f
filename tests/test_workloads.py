"""The code and math workloads: splits, generators, the math checker, JSONL export (local, S3, CLI)."""

from __future__ import annotations

import json
import re

import pytest

from jf_ray.cli.main import main
from jf_ray.errors import UserInputError
from jf_ray.workloads import load_examples, read_examples, write_examples
from jf_ray.workloads.code import (
    body_parses,
    code_examples,
    extract_functions,
    file_split,
    split_files,
    stdlib_files,
)
from jf_ray.workloads.math import column, final_answer, generate_math, is_correct, problem_split

_EQUATION_RE = re.compile(r"((?:\d+ [-+*/] )+\d+) = (\d+)")
_COLUMN_RE = re.compile(r"(\d+) ([-+]) (\d+): [^\n]*; so (\d+)")


# ---------------------------------------------------------------- math


def test_math_is_deterministic_per_seed_and_fresh_across_seeds():
    assert generate_math(20, "heldout", seed=3) == generate_math(20, "heldout", seed=3)
    other = {e.prompt for e in generate_math(20, "heldout", seed=4)}
    assert not other & {e.prompt for e in generate_math(20, "heldout", seed=3)}


def test_math_splits_never_share_a_problem():
    heldout = generate_math(300, "heldout", seed=0)
    assert all(problem_split(e.prompt) == "heldout" for e in heldout)
    train = {e.prompt for seed in (0, 1) for e in generate_math(1500, "train", seed=seed)}
    assert not train & {e.prompt for e in heldout}


def test_math_solutions_compute_exactly():
    for example in generate_math(300, "train", seed=7):
        equations = list(_EQUATION_RE.finditer(example.answer))
        columns = list(_COLUMN_RE.finditer(example.answer))
        assert len(equations) >= 2, example.answer  # at least two events, each with a computation
        for match in equations:
            assert _evaluate(match[1]) == int(match[2]), example.answer
        for match in columns:
            assert _evaluate(f"{match[1]} {match[2]} {match[3]}") == int(match[4]), example.answer
        # The final answer is the result of the last computation.
        last = max(equations + columns, key=lambda m: m.end())
        assert final_answer(example.answer) == int(last[len(last.groups())])


def test_column_arithmetic_covers_every_pair():
    for a in range(100):
        for b in range(100):
            if a + b <= 99:
                assert column(a, "+", b).endswith(f"so {a + b}")
            if b <= a:
                assert column(a, "-", b).endswith(f"so {a - b}")
    assert column(45, "+", 17) == "45 + 17: 5 + 7 = 12, carry 1; 4 + 1 + 1 = 6; so 62"
    assert column(42, "-", 7) == "42 - 7: 12 - 7 = 5, borrow 1; 4 - 0 - 1 = 3; so 35"


def _evaluate(expression: str) -> int:
    """Left-to-right value of ``a op b op c`` with integer division that must be exact."""
    tokens = expression.split()
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], map(int, tokens[2::2])):
        if op == "/":
            assert value % operand == 0
        value = {
            "+": value + operand,
            "-": value - operand,
            "*": value * operand,
            "/": value // max(operand, 1),
        }[op]
    return value


def test_math_checker_accepts_right_and_rejects_wrong_answers():
    example = generate_math(1, "heldout", seed=0)[0]
    value = final_answer(example.answer)
    assert is_correct(example.answer, example.answer)
    assert is_correct(f"Some steps.\nThe answer is {value}.", example.answer)
    assert is_correct(f"#### {value}", example.answer)
    assert is_correct(f"so the total is \\boxed{{{value}}}", example.answer)
    assert not is_correct(f"The answer is {value + 1}.", example.answer)
    assert not is_correct(f"The answer is {value}1.", example.answer)
    # A solution cut off before its final line does not pass, even if its last number is the answer.
    cut = example.answer.rsplit("\n", 1)[0]
    assert not is_correct(cut, example.answer)
    assert not is_correct("", example.answer)
    assert not is_correct(f"The answer is {value}.", "no reference answer here")


# ---------------------------------------------------------------- code


def test_code_split_is_by_file_and_disjoint():
    train, heldout = set(split_files("train")), set(split_files("heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(stdlib_files())
    assert all(file_split(f) == "heldout" for f in heldout)
    held_examples = code_examples("heldout", n=40, seed=0)
    train_examples = code_examples("train", n=40, seed=0)
    assert len(held_examples) == 40 and len(train_examples) == 40
    assert {e.source for e in held_examples} <= heldout
    assert {e.source for e in train_examples} <= train


def test_code_examples_are_seeded_and_parse():
    first = code_examples("heldout", n=15, seed=1)
    assert first == code_examples("heldout", n=15, seed=1)
    assert first != code_examples("heldout", n=15, seed=2)
    for example in first:
        assert example.prompt.startswith(("def ", "async def "))
        assert body_parses(example.prompt, example.answer)


SOURCE = '''
class Box:
    def area(self, scale=1):
        """Area of the box.

        Scaled by ``scale``.
        """
        w = self.w * scale
        return w * self.h

def no_doc(x):
    return x

def only_doc():
    """Nothing else."""
'''


def test_extract_functions_splits_signature_docstring_from_body():
    [example] = extract_functions(SOURCE, origin="box.py")
    assert example.prompt == 'def area(self, scale=1):\n    """Area of the box.\n\n    Scaled by ``scale``.\n    """\n'
    assert example.answer == "    w = self.w * scale\n    return w * self.h\n"
    assert example.source == "box.py"


def test_body_parses_needs_a_real_body():
    prompt = 'def f(x):\n    """Double x."""\n'
    assert body_parses(prompt, "    return 2 * x\n")
    assert body_parses(prompt, "def f(x):\n    return 2 * x\n")  # a model repeating the whole function
    assert not body_parses(prompt, "   \n")
    assert not body_parses(prompt, "    return 2 *\n")
    assert not body_parses(prompt, "return x\n")  # not indented: ends the function, body is empty


# ---------------------------------------------------------------- export


def test_jsonl_round_trip_local_and_s3(tmp_path, s3_bucket):
    examples = load_examples("math", "train", 5, seed=0) + load_examples("code", "heldout", 2, seed=0)
    for uri in (str(tmp_path / "out.jsonl"), f"{s3_bucket}/prompts/out.jsonl"):
        assert write_examples(uri, examples) == 7
        assert read_examples(uri) == examples
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "answer"} and set(rows[-1]) == {"prompt", "answer", "source"}


def test_load_examples_rejects_bad_input():
    with pytest.raises(UserInputError, match="task"):
        load_examples("poetry", "train", 3)
    with pytest.raises(UserInputError, match="split"):
        load_examples("math", "test", 3)
    with pytest.raises(UserInputError, match=">= 1"):
        load_examples("math", "train", 0)


def test_cli_data_export(tmp_path, capsys):
    out = tmp_path / "math.jsonl"
    code = main(
        [
            "data",
            "export",
            "--task",
            "math",
            "--split",
            "heldout",
            "--out",
            str(out),
            "--n",
            "4",
            "--seed",
            "9",
        ]
    )
    assert code == 0
    assert read_examples(str(out)) == generate_math(4, "heldout", seed=9)
    assert "wrote 4 math/heldout examples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["data", "export", "--task", "math", "--out", str(out), "--n", "0"])
    assert exc.value.code == 2
