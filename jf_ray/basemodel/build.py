"""Build the embedded base model into a standard Hugging Face checkpoint directory, cached by content hash.

The hash covers everything that determines the result: the resolved preset, the seed, the source code of
the data generators, tokenizer and training loop, and the stdlib file list the code workload reads. A
directory whose recorded hash matches is reused as is. A build happens in a temporary directory next to the
target and is renamed into place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from jf_ray.basemodel.presets import BasePreset, resolve_preset
from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

BUILD_INFO = "jf_build.json"
# Modules whose code decides the bytes of a build; editing one invalidates cached builds.
_SOURCE_MODULES = (
    "jf_ray.workloads.math",
    "jf_ray.workloads.code",
    "jf_ray.workloads.stdlib",
    "jf_ray.workloads.common",  # the split rule and the draw of distinct examples
    "jf_ray.basemodel.tokenizer",
    "jf_ray.basemodel.corpus",
    "jf_ray.basemodel.pretrain",
    "jf_ray.modeling",  # chat encoding and attention masks of the pretraining rows
)


def content_hash(preset: BasePreset, seed: int) -> str:
    from importlib import import_module

    from jf_ray.workloads.stdlib import stdlib_fingerprint

    digest = hashlib.sha256()
    digest.update(json.dumps({"preset": preset.model_dump(), "seed": seed}, sort_keys=True).encode())
    for name in _SOURCE_MODULES:
        digest.update(Path(import_module(name).__file__).read_bytes())
    digest.update(stdlib_fingerprint().encode())
    return digest.hexdigest()


def resolved_for_this_machine(preset: BasePreset) -> BasePreset:
    """``preset`` with its precision resolved on this processor (``auto``: bf16 only where native): the
    concrete choice is part of the content hash, since the two train different models."""
    from jf_ray.precision import resolve_precision

    choice = resolve_precision(preset.precision, "cpu", "pretrain")
    logger.info("base model precision: %s", choice.reason)
    return preset.model_copy(update={"precision": choice.name})


def read_build_info(checkpoint_dir: str | Path) -> dict | None:
    path = Path(checkpoint_dir) / BUILD_INFO
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_base(
    out_dir: str | Path,
    preset: str = "micro",
    seed: int = 0,
    overrides: Iterable[str] = (),
    force: bool = False,
    show_progress: bool = False,
    num_threads: int | None = None,
) -> Path:
    """Build (or reuse) the base model of ``preset`` in ``out_dir``; returns the checkpoint directory.

    >>> path = build_base("/tmp/jf-micro", preset="micro")           # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)                   # doctest: +SKIP
    """
    import torch

    from jf_ray.storage.uri import local_path

    out = Path(local_path(str(out_dir)))
    resolved = resolved_for_this_machine(resolve_preset(preset, overrides))
    key = content_hash(resolved, seed)
    info = read_build_info(out)
    if not force and info is not None and info.get("content_hash") == key:
        logger.info("base model %s is up to date (hash %s), reusing it", out, key[:12])
        return out
    if out.exists() and info is None and any(out.iterdir()):
        raise UserInputError(f"{out} exists and is not a base-model build; choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()  # the thread count is process-wide: give it back afterwards
    torch.set_num_threads(num_threads or default_num_threads())
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _build_into(tmp, preset, resolved, seed, key, show_progress)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads_before)
    return out


def _build_into(tmp: Path, name: str, preset: BasePreset, seed: int, key: str, show_progress: bool) -> None:
    import torch

    from jf_ray.basemodel.corpus import build_rows, tokenizer_texts
    from jf_ray.basemodel.pretrain import new_model, pretrain, seed_everything
    from jf_ray.basemodel.tokenizer import train_tokenizer
    from jf_ray.modeling import num_parameters
    from jf_ray.precision import machine_record

    start = time.perf_counter()
    seed_everything(seed)
    tokenizer = train_tokenizer(tokenizer_texts(preset, seed), preset.vocab_size)
    rows = build_rows(tokenizer, preset, seed)
    data_s = time.perf_counter() - start
    seed_everything(seed)
    model = new_model(preset, tokenizer)
    logger.info("building %s base model: %.2fM parameters", name, num_parameters(model) / 1e6)
    summary = pretrain(model, rows, preset, seed, show_progress=show_progress)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "content_hash": key,
        "preset_name": name,
        "preset": preset.model_dump(),
        "seed": seed,
        "parameters": num_parameters(model),
        "corpus_rows": len(rows),
        "corpus_loss_tokens": rows.loss_tokens,
        "data_s": round(data_s, 1),
        "build_s": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_record(),
        **summary,
    }
    (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("built %s base model in %.1f s", name, info["build_s"])


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build onto ``out``; an older build there is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_base_uri(out_uri: str, **kwargs) -> str:
    """:func:`build_base` for any storage URI: remote targets are built in the local cache, then uploaded.

    The upload is skipped when the remote copy already records the same content hash.
    """
    from jf_ray.storage import is_local, join_uri, upload_dir

    if is_local(out_uri):
        return str(build_base(out_uri, **kwargs))
    cache = Path(os.environ.get("JF_CACHE_DIR", Path.home() / ".cache" / "jf_ray")) / "base"
    name = hashlib.sha256(out_uri.encode()).hexdigest()[:24]
    local = build_base(cache / name, **kwargs)
    key = read_build_info(local)["content_hash"]
    remote = read_build_info_uri(out_uri)
    if remote is None or remote.get("content_hash") != key:
        upload_dir(local, out_uri)
    else:
        logger.info("%s already holds this build (hash %s)", join_uri(out_uri, BUILD_INFO), key[:12])
    return out_uri


def read_build_info_uri(uri: str) -> dict | None:
    from jf_ray.storage import exists, is_local, join_uri, local_path, read_json

    if is_local(uri):
        return read_build_info(local_path(uri))
    info_uri = join_uri(uri, BUILD_INFO)
    return read_json(info_uri) if exists(info_uri) else None


def default_num_threads() -> int:
    """Threads for training: OMP_NUM_THREADS when set, else the cores this process may run on."""
    from_env = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    return from_env or len(os.sched_getaffinity(0))
