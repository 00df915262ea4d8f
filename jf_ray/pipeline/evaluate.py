"""Evaluation inside the job: quality and speed of one model on one task's held-out examples.

The per-round evaluation decodes with one decoder; the final benchmark runs every decoder back to back.
Both go through :func:`jf_ray.evaluation.evaluate_decoders`, the same code as ``jf-ray eval``, so every row
of the report carries the bench fields (TPF, tokens/s, speed-up and exactness vs AR, repetition) and the
quality fields of :mod:`jf_ray.scoring` under the same names. Plain functions; the job runs them as Ray tasks
so that they land on a GPU worker on clusters.
"""

from __future__ import annotations

import logging

from jf_ray.bench.decoders import VLLM, vllm_runner
from jf_ray.decoding import DecodeConfig
from jf_ray.evaluation import evaluate_decoders
from jf_ray.scoring import QUALITY_FIELDS
from jf_ray.workloads import read_examples
from jf_ray.workloads.common import LOSS_TASKS

logger = logging.getLogger(__name__)


def evaluate_task(
    model_uri: str,
    task: str,
    examples_uri: str,
    decoders: list[str],
    block_size: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 1,
    decode: dict | None = None,
    warmup: bool = True,
    vllm_reference: bool | None = False,
    vllm_eager: bool = False,
) -> dict:
    """{decoder: bench fields + pass_at_1 (code), accuracy (math) or loss (stdlib)} for ``model_uri``.

    ``warmup=False`` where only the outputs count (the per-round quality evaluation), not the timing.
    ``vllm_reference`` adds vLLM's greedy AR of the same checkpoint (row ``vllm``; ``speedup_vs_vllm`` on
    every decoder, docs/vllm.md): True requires it, None adds it where vLLM is installed and runs the model."""
    from jf_ray.modeling import load_model, load_tokenizer, set_torch_threads

    set_torch_threads(threads)
    tokenizer, model = load_tokenizer(model_uri), load_model(model_uri)
    examples = read_examples(examples_uri)
    config = DecodeConfig(block_size=block_size, max_new_tokens=max_new_tokens, seed=seed, **(decode or {}))
    engine = None
    if vllm_reference is not False:
        engine = _vllm_engine(model_uri, model, batch_size, threads, vllm_eager, vllm_reference is None)
    references = {VLLM: vllm_runner(engine)} if engine is not None else {}
    try:
        rows = evaluate_decoders(
            model,
            tokenizer,
            examples,
            decoders,
            config,
            batch_size,
            repeats,
            warmup,
            by_loss=task in LOSS_TASKS,
            references=references,
        )
    finally:
        if engine is not None:
            from jf_ray.vllm_engine import close_engine

            close_engine(engine)
    report = {}
    for name in [*decoders, *references]:
        report[name] = {k: v for k, v in rows[name].items() if k != "samples"}
        quality = {k: report[name][k] for k in QUALITY_FIELDS if k in report[name]}
        logger.info("%s %s %s: tpf %.2f, %s", model_uri, task, name, report[name]["tpf"], quality)
    report["samples"] = rows[decoders[-1]]["samples"][:2]
    return report


def _vllm_engine(model_uri: str, model, batch_size: int, threads, eager: bool, optional: bool):
    """A vLLM engine on the checkpoint; ``optional``: None with a warning where vLLM cannot run it."""
    from jf_ray.errors import UserInputError
    from jf_ray.modeling import local_model_path
    from jf_ray.vllm_engine import VllmOptions, check_vllm_model, open_engine, vllm_installed

    if optional and not vllm_installed():
        return None
    path = local_model_path(model_uri)
    device = "cpu" if next(model.parameters()).device.type == "cpu" else "cuda"
    options = VllmOptions(device=device, max_num_seqs=batch_size, num_threads=threads, enforce_eager=eager)
    try:
        check_vllm_model(path, options)
        return open_engine(path, options)
    except UserInputError as exc:
        if not optional:
            raise
        logger.warning("benchmark without the vLLM reference: %s", exc)
        return None


def evaluate_remote(resources: dict, **kwargs) -> dict:
    """Run :func:`evaluate_task` as a Ray task with ``resources`` (e.g. one GPU on clusters)."""
    import ray

    task = ray.remote(evaluate_task).options(**resources)
    return ray.get(task.remote(**kwargs))
