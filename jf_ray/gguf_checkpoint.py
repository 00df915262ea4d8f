"""A GGUF file (llama.cpp's quantized format) as a plain Hugging Face checkpoint, converted once and cached.

Every consumer reaches models through :func:`jf_ray.modeling.local_model_path`, which sends a ``.gguf`` path or
URI here: transformers dequantizes the file to fp32 weights, which are saved as safetensors beside the
tokenizer (chat template included), in a cache directory named by the file's sha256. Serving, benchmarks,
evaluation, collection, training and vLLM then all load the same ordinary checkpoint, and only the first of
them pays for the conversion (~20 s for SmolLM2-135M on 2 cores). The checkpoint records where it came from
in ``jf_provenance.json``.

Needs the ``gguf`` extra (the ``gguf`` and ``accelerate`` packages); without it, a :class:`UserInputError`
says how to install it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
PROVENANCE_FILE = "jf_provenance.json"
EXTRA_HINT = "pip install 'jf-ray[gguf]'"
_REQUIRED_PACKAGES = ("gguf", "accelerate")  # transformers reads GGUF with the first, loads it with the second
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: every loader asks, hash once


def is_gguf_reference(model: str) -> bool:
    """Whether a model reference names a GGUF file (a path or URI ending in ``.gguf``)."""
    return model.lower().endswith(GGUF_SUFFIX)


def gguf_checkpoint(model: str, cache_dir: str | Path | None = None) -> Path:
    """The local checkpoint converted from the GGUF file ``model`` (path, ``file://`` or ``s3://`` URI).

    Converted on the first call for a file's content; later calls, from any process, find it by hash (and
    need no GGUF packages).
    """
    path = local_gguf_file(model, cache_dir)
    target = cache_root(cache_dir) / file_sha256(path)[:32]
    if read_provenance(target) is None:
        convert_gguf(path, target, {"source": model})
    return target


def require_gguf_packages() -> None:
    missing = [name for name in _REQUIRED_PACKAGES if not _importable(name)]
    if missing:
        raise UserInputError(f"GGUF models need the {' and '.join(missing)} package(s): {EXTRA_HINT}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("JF_CACHE_DIR", Path.home() / ".cache" / "jf_ray")) / "gguf"


def local_gguf_file(model: str, cache_dir: str | Path | None = None) -> Path:
    """A local path of the GGUF file ``model`` names; an object-store file is downloaded into the cache first."""
    from jf_ray.storage import is_local, local_path

    if is_local(model):
        path = Path(local_path(model)).expanduser()
        if not path.is_file():
            raise UserInputError(f"GGUF file not found: {model}")
        return path
    return _download(model, cache_root(cache_dir) / "downloads")


def _download(uri: str, directory: Path) -> Path:
    """Copy a remote file once per (URI, size, modification time), renamed into place when complete."""
    import pyarrow.fs as pafs

    from jf_ray.storage import fs_and_path

    fs, remote = fs_and_path(uri)
    info = fs.get_file_info(remote)
    if info.type != pafs.FileType.File:
        raise UserInputError(f"GGUF file not found: {uri}")
    key = hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    target = directory / f"{key}{GGUF_SUFFIX}"
    if target.is_file() and target.stat().st_size == info.size:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{os.getpid()}-{target.name}"
    pafs.copy_files(remote, str(tmp), source_filesystem=fs)
    os.replace(tmp, target)
    logger.info("downloaded %s (%.1f MB) to %s", uri, info.size / 1e6, target)
    return target


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def convert_gguf(path: Path, out: Path, provenance: dict | None = None) -> dict:
    """Write the plain checkpoint of the GGUF file ``path`` to the local directory ``out``; returns its
    provenance (``provenance`` added to what the file says about itself)."""
    require_gguf_packages()
    header = read_gguf_header(path)
    start = time.perf_counter()
    model, tokenizer = _load_dequantized(path, header["architecture"])
    with staged_dir(out) as tmp:
        plain = plain_copy(model)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = _provenance(path, header, plain, time.perf_counter() - start) | (provenance or {})
        write_provenance(tmp, record)
    kind = f"{header['architecture']}, {header['quantization']}"
    logger.info("converted %s (%s) to %s in %.1f s", path.name, kind, out, record["convert_s"])
    return record


def read_gguf_header(path: Path) -> dict:
    """The architecture and quantization a GGUF file declares (read from its metadata, no weights)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise UserInputError(f"{path} is not a readable GGUF file: {exc}") from None
    architecture = reader.fields["general.architecture"].contents()
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    file_type = reader.fields.get("general.file_type")
    if file_type is not None:
        quantization = gguf.LlamaFileType(file_type.contents()).name.removeprefix("MOSTLY_")
    else:  # older files: the most common tensor type names the quantization
        quantization = types.most_common(1)[0][0] if types else None
    return {"architecture": architecture, "quantization": quantization, "tensor_types": dict(types)}


def _load_dequantized(path: Path, architecture: str):
    """The GGUF model with every weight unpacked to fp32, and its tokenizer, as transformers reads them."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise UserInputError(
            f"transformers {transformers.__version__} cannot dequantize GGUF architecture {architecture!r} "
            f"({path.name}): {exc}"
        ) from None
    return model, tokenizer


def plain_copy(model):
    """The same architecture and weights without the GGUF quantization record.

    ``save_pretrained`` refuses a GGUF-loaded model ("not serializable") although its weights are already
    plain fp32 tensors: a model built from the config minus ``quantization_config``, holding those tensors,
    saves as any checkpoint.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


def _provenance(path: Path, header: dict, model, seconds: float) -> dict:
    import gguf
    import transformers

    return {
        "format": "gguf",
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        **header,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _version("gguf"),
        "convert_s": round(seconds, 1),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_provenance(directory: Path, record: dict) -> None:
    (directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_provenance(model_dir: str | Path) -> dict | None:
    """Where a checkpoint came from (a converted GGUF file, a fetch), or None for any other checkpoint."""
    try:
        return json.loads((Path(model_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temp directory beside ``out`` that becomes ``out`` when the block ends without error.

    Readers never see half a checkpoint, and when several processes (Ray workers on one node) convert the
    same file at once, the first rename wins and the others leave the finished copy in place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users of a shared cache
        try:
            os.replace(tmp, out)
        except OSError:
            if read_provenance(out) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
