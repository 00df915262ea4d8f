"""The ``stdlib`` workload, a language-modelling set: real Python source available offline, the running
interpreter's standard library.

Files are split by a hash of their path relative to the stdlib root (so the split is the same on every
machine with the same Python), never by function: a held-out file contributes nothing to training, neither
raw text nor prompts. A prompt is the opening of a function that has a docstring (the ``def`` line(s) and the
docstring, dedented); the answer is the rest of the body.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import os
import random
import sysconfig
import textwrap
from pathlib import Path

from jf_ray.workloads.common import Example, Split, check_split, split_of

logger = logging.getLogger(__name__)

# Tests, IDLE's tests and 2to3 fixtures hold deliberately odd or Python-2 code; site-packages is not stdlib.
EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
MAX_PROMPT_CHARS = 1200
MAX_BODY_CHARS = 1500
MAX_BODY_LINES = 30
MAX_FUNCTIONS_PER_FILE = 8


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Paths (relative to the stdlib root, sorted) of every stdlib ``*.py`` file outside the excluded dirs."""
    root = stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        rel_dir = Path(directory).relative_to(root)
        found.extend(str(rel_dir / name) for name in files if name.endswith(".py"))
    return tuple(sorted(found))


def stdlib_fingerprint() -> str:
    """Hash of the stdlib file list with sizes: changes when the corpus the split draws from changes."""
    root = stdlib_root()
    digest = hashlib.sha256()
    for rel in stdlib_files():
        digest.update(f"{rel}:{(root / rel).stat().st_size}\n".encode())
    return digest.hexdigest()


def split_files(split: Split, seed: int | None = None) -> list[str]:
    """The files of ``split``: sorted, or shuffled deterministically when ``seed`` is given."""
    check_split(split)
    files = [rel for rel in stdlib_files() if split_of(rel) == split]
    if seed is not None:
        random.Random(f"stdlib-files/{split}/{seed}").shuffle(files)
    return files


def read_source(rel_path: str) -> str | None:
    try:
        return (stdlib_root() / rel_path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def extract_functions(source: str, origin: str = "") -> list[Example]:
    """Every usable function of ``source`` as (signature + docstring) -> body, in source order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            example = _function_example(node, lines, origin)
            if example is not None:
                found.append((node.lineno, example))
    return [example for _, example in sorted(found, key=lambda pair: pair[0])]


def _function_example(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], origin: str):
    if ast.get_docstring(node) is None or len(node.body) < 2:
        return None
    doc_end, body_start = node.body[0].end_lineno, node.body[1].lineno
    if body_start <= doc_end or node.end_lineno - doc_end > MAX_BODY_LINES:
        return None  # a statement on the docstring's line, or a body too long for a prompt/answer pair
    text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
    head_lines = doc_end - node.lineno + 1
    text_lines = text.splitlines(keepends=True)
    prompt, answer = "".join(text_lines[:head_lines]), "".join(text_lines[head_lines:])
    if not answer.endswith("\n"):
        answer += "\n"
    if len(prompt) > MAX_PROMPT_CHARS or len(answer) > MAX_BODY_CHARS or not answer.strip():
        return None
    if not parses(prompt + answer):
        return None  # dedent failed (a docstring line less indented than the def), or a tab/space mix
    return Example(prompt=prompt, answer=answer, source=origin)


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def body_parses(prompt: str, body: str) -> bool:
    """Whether ``prompt + body`` parses and the body adds at least one statement after the docstring.

    A blank body would leave a valid docstring-only function; that is not a generated body.
    """
    # A chat model may repeat the whole function instead of continuing it.
    code = body if body.lstrip().startswith(("def ", "async def ", "@")) else prompt + body
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        return False
    statements = functions[0].body
    return len(statements) > (1 if ast.get_docstring(functions[0]) is not None else 0)


def stdlib_examples(split: Split, n: int, seed: int = 0) -> list[Example]:
    """Up to ``n`` functions of ``split``: files in a seeded order, a few (seeded pick) per file first.

    Files are read only until ``n`` is reached, so small requests stay fast; when the capped pass falls
    short, the functions left over by the cap fill up the rest.
    """
    rng = random.Random(f"stdlib-functions/{split}/{seed}")
    examples: list[Example] = []
    leftovers: list[Example] = []
    for rel in split_files(split, seed=seed):
        source = read_source(rel)
        found = extract_functions(source, origin=rel) if source else []
        if len(found) > MAX_FUNCTIONS_PER_FILE:
            picked = set(rng.sample(range(len(found)), MAX_FUNCTIONS_PER_FILE))
            leftovers.extend(e for i, e in enumerate(found) if i not in picked)
            found = [e for i, e in enumerate(found) if i in picked]
        examples.extend(found[: n - len(examples)])
        if len(examples) >= n:
            return examples
    examples.extend(leftovers[: n - len(examples)])
    if len(examples) < n:
        logger.info("stdlib/%s has only %d usable functions (asked for %d)", split, len(examples), n)
    return examples


def stdlib_corpus(split: Split, max_chars: int, seed: int = 0) -> list[str]:
    """Whole source files of ``split`` (seeded order) until ``max_chars`` characters, for raw-code pretraining."""
    texts: list[str] = []
    total = 0
    for rel in split_files(split, seed=seed):
        if total >= max_chars:
            break
        source = read_source(rel)
        if source:
            texts.append(source[: max_chars - total])
            total += len(texts[-1])
    return texts
