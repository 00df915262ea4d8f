"""Task quality and speed of a model, decoded with any decoder of :mod:`jf_ray.decoding`: one home for both
``jf-ray eval`` and the job's evaluation (:mod:`jf_ray.pipeline.evaluate`).

:func:`evaluate_decoders` decodes a set of examples with greedy AR (the reference) and each asked decoder,
back to back (:func:`jf_ray.bench.decoders.run_decoders`), and gives every decoder one row: the bench fields
(tokens, forwards, TPF, tokens/s, speed-up and exactness vs AR, repetition) and the quality fields of
:mod:`jf_ray.scoring` (``pass_at_1`` for executed code, ``accuracy`` for answers, ``loss`` for the stdlib
language-modelling set). :func:`evaluate` is the CLI's entry point: one model, one task or user set, one
decoder beside AR. See docs/evaluation.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field, model_validator

from jf_ray.config import DType, Location, StageConfig
from jf_ray.decoding import DecodeConfig
from jf_ray.errors import UserInputError
from jf_ray.sandbox import SandboxLimits
from jf_ray.workloads import Example
from jf_ray.workloads.common import LOSS_TASKS, TEST_ONLY_TASKS, Split
from jf_ray.workloads.tasks import Task

logger = logging.getLogger(__name__)

# Longest math solutions are ~200 tokens; code bodies and HumanEval completions are longer.
DEFAULT_MAX_NEW_TOKENS = {"math": 256, "wordmath": 256, "code": 128, "stdlib": 384, "humaneval": 512}
DEFAULT_EXAMPLES = 200


class EvalConfig(StageConfig):
    """One evaluation run: which model, task (or user set) and examples, and how to decode and execute."""

    model: str = Field(..., description="HF checkpoint dir, file:// or s3:// URI, or hub name")
    task: Task = Field(..., description="workload to evaluate on (with prompts: the label of the report)")
    prompts: Location | None = Field(
        None,
        description="JSONL of your own examples instead of the task's: {prompt, tests, entry_point} rows are "
        "executed (pass@1), {prompt, answer} rows checked by final answer (accuracy); or a Hugging Face dataset "
        "(hf://datasets/NAME, a save_to_disk dir, Parquet/JSON/CSV) with ?column= or ?template= naming the prompt "
        "and ?answer= the answer (docs/evaluation.md)",
    )
    split: Split = Field("heldout", description="workload split (heldout: never trained on)")
    n: int | None = Field(None, ge=1, description="number of examples (default: 200, all of HumanEval or the file)")
    seed: int = Field(0, description="which examples are drawn (generated workloads: fresh tasks per seed)")
    batch_size: int = Field(8, ge=1, description="requests decoded together (continuous batching)")
    dtype: DType = Field("auto", description="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    timeout_s: float = Field(10.0, gt=0, description="wall-clock limit of each executed program (sandbox)")
    decode: DecodeConfig = Field(description="how to decode; unset fields: AR, the task's max_new_tokens, seed above")

    @model_validator(mode="before")
    @classmethod
    def _decode_defaults(cls, data: Any) -> Any:
        """Decode settings the evaluation decides where the config gives none (a DecodeConfig is kept whole)."""
        if not isinstance(data, dict) or not isinstance(data.get("decode", {}), dict):
            return data
        decode = {"decoder": "ar", "seed": data.get("seed", cls.model_fields["seed"].default), **data.get("decode", {})}
        if data.get("task") in DEFAULT_MAX_NEW_TOKENS:
            decode.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS[data["task"]])
        return {**data, "decode": decode}


def load_eval_examples(config: EvalConfig) -> list[Example]:
    from jf_ray.prompt_sources import read_example_set
    from jf_ray.workloads import load_examples

    if config.prompts is not None:
        examples = read_example_set(config.prompts)[: config.n]
        if not examples:
            raise UserInputError(f"{config.prompts} holds no examples")
        if len({bool(ex.tests) for ex in examples}) > 1:
            raise UserInputError(f"{config.prompts} mixes rows with tests and rows with answers; use two files")
        return examples
    default = 10**6 if config.task in TEST_ONLY_TASKS else DEFAULT_EXAMPLES  # a test set: all of it
    return load_examples(config.task, config.split, config.n or default, seed=config.seed)


def evaluate(config: EvalConfig, progress_factory: Callable[[str, int], Callable[[int], None]] | None = None) -> dict:
    """The CLI's evaluation: ``config.decode.decoder`` beside greedy AR; the report is that decoder's row
    (with ``speedup_vs_ar``) plus the AR row under ``ar``."""
    from jf_ray.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    examples = load_eval_examples(config)
    decoder = config.decode.decoder
    rows = evaluate_decoders(
        model,
        tokenizer,
        examples,
        [decoder],
        config.decode,
        config.batch_size,
        warmup=decoder != "ar",
        progress_factory=progress_factory,
        limits=SandboxLimits(timeout_s=config.timeout_s),
        by_loss=config.task in LOSS_TASKS and config.prompts is None,
    )
    report = {"config": config.model_dump(), "task": config.task, "decoder": decoder, **rows[decoder]}
    if decoder != "ar":
        report["ar"] = {k: v for k, v in rows["ar"].items() if k != "samples"}
    return report


def evaluate_decoders(
    model,
    tokenizer,
    examples: list[Example],
    decoders: list[str],
    decode_config: DecodeConfig,
    batch_size: int,
    repeats: int = 1,
    warmup: bool = True,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
    limits: SandboxLimits = SandboxLimits(),
    by_loss: bool = False,
    references: dict | None = None,
) -> dict[str, dict]:
    """{decoder: bench fields + quality fields} for AR and every decoder of ``decoders`` on ``examples``.

    ``by_loss``: score by the loss of the reference answers, not by passing (the ``stdlib`` set); otherwise
    the examples decide (tests or answers). ``warmup=False`` where only the outputs count, not the timing.
    ``references``: outside runners timed beside the decoders (``{"vllm": vllm_runner(engine)}``, see
    :mod:`jf_ray.bench.decoders`); every row then also carries its speed-up over each of them.
    """
    from jf_ray.bench.decoders import run_decoders, summarize_runs
    from jf_ray.modeling import encode_prompt, eos_token_ids
    from jf_ray.scoring import NUM_SAMPLES, score_outputs

    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    eos = eos_token_ids(model, tokenizer)
    runs = run_decoders(
        model, prompts, decoders, decode_config, eos, batch_size, progress_factory, repeats, warmup, references
    )
    summaries = summarize_runs(runs, prompts, list(runs), list(references or {}))
    loss = answer_loss(model, tokenizer, examples, batch_size)["loss"] if by_loss else None
    rows, verdicts = {}, {}
    for name, run in runs.items():
        texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in run.results]
        if loss is None:
            quality = score_outputs(examples, texts, limits, verdicts)
        else:
            samples = [{"prompt": ex.prompt, "output": t} for ex, t in list(zip(examples, texts))[:NUM_SAMPLES]]
            quality = {"n": len(examples), "loss": loss, "samples": samples}
        rows[name] = {**summaries[name], **quality}
    return rows


@torch.no_grad()
def answer_loss(model, tokenizer, examples: list[Example], batch_size: int = 8) -> dict:
    """Mean per-token cross-entropy of each reference answer (+ EOS) given its chat-formatted prompt."""
    from jf_ray.modeling import encode_chat_examples

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
