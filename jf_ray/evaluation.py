"""Task quality of a model on the embedded workloads, decoded with any decoder of :mod:`jf_ray.decoding`.

* ``math``: exact-match accuracy of the final answer (``The answer is N``).
* ``code``: teacher-forced per-token loss of the reference bodies given their prompts (chat format, answer
  tokens and EOS only), and the share of generated bodies that make the function parse with :mod:`ast`.

Both also return the decoder's counters (tokens, forwards, TPF, tokens/s, wall time) of the batched decode,
so one call says how good and how fast. :func:`run_eval` is the entry point of the CLI and the pipeline.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from jf_ray.config import StageConfig
from jf_ray.decoding import DecodeConfig, DecodeStats, generate
from jf_ray.workloads import Example, load_examples
from jf_ray.workloads.code import body_parses
from jf_ray.workloads.math import final_answer, is_correct

logger = logging.getLogger(__name__)

NUM_SAMPLES = 3  # decoded examples kept in a report, for a human to eyeball
_FENCE_RE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


DEFAULT_MAX_NEW_TOKENS = {"math": 256, "code": 384}  # longest math solutions (~200 tokens), stdlib bodies


class EvalConfig(StageConfig):
    """One evaluation run: which model, task, split and examples, and how to decode."""

    model: str = Field(..., description="HF checkpoint dir, file:// or s3:// URI, or hub name")
    task: Literal["code", "math"] = Field(..., description="workload to evaluate on")
    split: Literal["train", "heldout"] = Field("heldout", description="workload split (heldout: never trained on)")
    n: int = Field(200, ge=1, description="number of examples (code: capped by the functions the split has)")
    seed: int = Field(0, description="which examples are drawn (math: fresh problems per seed)")
    batch_size: int = Field(8, ge=1, description="requests decoded together (continuous batching)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="model dtype")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    decode: DecodeConfig = Field(default_factory=lambda: DecodeConfig(decoder="ar"), description="how to decode")


def run_eval(
    model_uri: str,
    task: str,
    split: str = "heldout",
    decoder: str = "ar",
    n: int = 200,
    seed: int = 0,
    block_size: int = 16,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    **decode_fields,
) -> dict:
    """Load ``model_uri``, draw ``n`` examples of ``task``/``split`` and evaluate; returns the report dict.

    ``decode_fields`` are further :class:`DecodeConfig` fields (``num_blocks``, ``temperature``, ...).

    >>> report = run_eval("/tmp/jf-small", "math", decoder="jacobi", n=100)   # doctest: +SKIP
    >>> report["accuracy"], report["stats"]["tpf"]                           # doctest: +SKIP
    """
    decode = dict(
        decoder=decoder,
        block_size=block_size,
        seed=seed,
        **decode_fields,
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task, 256),
    )
    config = EvalConfig.from_dict(
        dict(
            model=model_uri,
            task=task,
            split=split,
            n=n,
            seed=seed,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            decode=decode,
        )
    )
    return evaluate(config)


def evaluate(config: EvalConfig, progress: Callable[[int], None] | None = None) -> dict:
    from jf_ray.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    examples = load_examples(config.task, config.split, config.n, seed=config.seed)
    evaluate_task = evaluate_math if config.task == "math" else evaluate_code
    report = evaluate_task(model, tokenizer, examples, config.decode, config.batch_size, progress)
    return {"config": config.model_dump(), **report}


def evaluate_math(
    model,
    tokenizer,
    problems: list[Example],
    decode_config: DecodeConfig,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Exact final-answer accuracy of greedy/sampled solutions to ``problems``."""
    outputs, decode = decode_examples(model, tokenizer, problems, decode_config, batch_size, progress)
    correct = [is_correct(text, problem.answer) for text, problem in zip(outputs, problems)]
    samples = [
        {"prompt": p.prompt, "output": text, "expected": final_answer(p.answer), "correct": ok}
        for p, text, ok in list(zip(problems, outputs, correct))[:NUM_SAMPLES]
    ]
    return {
        "task": "math",
        "n": len(problems),
        "accuracy": round(sum(correct) / len(problems), 4) if problems else 0.0,
        "correct": sum(correct),
        **decode,
        "samples": samples,
    }


def evaluate_code(
    model,
    tokenizer,
    examples: list[Example],
    decode_config: DecodeConfig,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Held-out loss of the reference bodies and the share of generated bodies that parse."""
    loss = answer_loss(model, tokenizer, examples, batch_size)
    outputs, decode = decode_examples(model, tokenizer, examples, decode_config, batch_size, progress)
    parsed = [body_parses(example.prompt, extract_code(text)) for example, text in zip(examples, outputs)]
    samples = [
        {"prompt": e.prompt, "output": text, "parses": ok}
        for e, text, ok in list(zip(examples, outputs, parsed))[:NUM_SAMPLES]
    ]
    return {
        "task": "code",
        "n": len(examples),
        "loss": loss["loss"],
        "loss_tokens": loss["tokens"],
        "parse_rate": round(sum(parsed) / len(examples), 4) if examples else 0.0,
        **decode,
        "samples": samples,
    }


def extract_code(text: str) -> str:
    """The code in a reply: the first fenced block if the model wrote Markdown, else the text as is."""
    match = _FENCE_RE.search(text)
    return match.group(1) if match else text


def decode_examples(
    model,
    tokenizer,
    examples: list[Example],
    decode_config: DecodeConfig,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], dict]:
    """Decode every prompt (chat template) in batches; returns the texts and a stats section for the report."""
    from jf_ray.modeling import encode_prompt, eos_token_ids

    prompts = [encode_prompt(tokenizer, example.prompt) for example in examples]
    start = time.perf_counter()
    results = generate(model, prompts, decode_config, eos_token_ids(model, tokenizer), batch_size, progress)
    wall_s = time.perf_counter() - start
    stats = DecodeStats()
    for result in results:
        stats = stats.merge(result.stats)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]
    return texts, {
        "decoder": decode_config.decoder,
        "stats": batch_stats(stats, wall_s),
        "finish_reasons": dict(Counter(r.finish_reason for r in results)),
    }


def batch_stats(stats: DecodeStats, wall_s: float) -> dict:
    """Merged counters, with time taken from the whole batched run.

    Requests decoded together overlap in time, so the sum of their own wall times overstates the run; tokens/s
    is total tokens over the run's wall time, as ``jf-ray bench`` reports it.
    """
    out = stats.to_dict()
    out["request_wall_s"] = out["wall_s"]
    out["wall_s"] = round(wall_s, 4)
    out["tokens_per_s"] = round(stats.tokens / wall_s, 2) if wall_s > 0 else 0.0
    return out


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[Example], batch_size: int = 8) -> dict:
    """Mean per-token cross-entropy of each reference answer (+ EOS) given its chat-formatted prompt."""
    from jf_ray.basemodel.tokenizer import encode_chat_examples

    total, count = 0.0, 0
    device = next(model.parameters()).device
    encoded = encode_chat_examples(tokenizer, [(e.prompt, e.answer) for e in examples])
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        input_ids, labels, attention = _right_padded(batch, tokenizer.pad_token_id or 0)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:].to(device), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((labels[:, 1:] != -100).sum())
    return {"loss": round(total / count, 4) if count else float("nan"), "tokens": count}


def _right_padded(batch: list[tuple[list[int], int]], pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention
