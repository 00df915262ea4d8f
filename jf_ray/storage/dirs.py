"""Whole directories (checkpoints) to and from storage URIs.

``upload_dir`` removes the completion marker, copies every file, then writes the marker last, so a reader
that sees the marker sees a complete upload. ``download_dir`` copies a remote directory into a local cache
keyed by the URI and reuses it while the remote marker is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from jf_ray.errors import UserInputError
from jf_ray.storage.io import delete_file, read_json, write_json_atomic
from jf_ray.storage.uri import exists, fs_and_path, is_local, join_uri, local_path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_JF_COMPLETE.json"
_LOCAL_STAMP = ".jf_download.json"


def upload_dir(local_dir: str | Path, uri: str) -> dict:
    """Copy ``local_dir`` (recursively) to ``uri``; the completion marker is written last."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise UserInputError(f"not a directory: {local_dir}")
    files = {str(p.relative_to(local_dir)): p.stat().st_size for p in sorted(local_dir.rglob("*")) if p.is_file()}
    files.pop(COMPLETE_MARKER, None)
    marker_uri = join_uri(uri, COMPLETE_MARKER)
    delete_file(marker_uri)
    fs, path = fs_and_path(uri)
    if is_local(uri):
        fs.create_dir(path, recursive=True)
    for rel in files:
        if rel == _LOCAL_STAMP:
            continue
        pafs.copy_files(str(local_dir / rel), f"{path}/{rel}", destination_filesystem=fs)
    marker = {"files": files, "uploaded_at": time.time()}
    write_json_atomic(marker_uri, marker)
    logger.info("uploaded %d files (%.1f MB) to %s", len(files), sum(files.values()) / 1e6, uri)
    return marker


def download_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the contents of ``uri`` (the path itself for local URIs)."""
    if is_local(uri):
        path = Path(local_path(uri))
        if not path.is_dir():
            raise UserInputError(f"directory not found: {uri}")
        return path
    listing = _remote_listing(uri)
    target = _cache_root(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if _stamp(target) == listing:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=target.parent))
    try:
        _copy_listed(uri, listing["files"], tmp)
        (tmp / _LOCAL_STAMP).write_text(json.dumps(listing, sort_keys=True))
        _replace_dir(tmp, target, listing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloaded %s to %s", uri, target)
    return target


def _remote_listing(uri: str) -> dict:
    """The remote marker, or (no marker: uploaded by another tool) a listing of files and sizes."""
    marker_uri = join_uri(uri, COMPLETE_MARKER)
    if exists(marker_uri):
        marker = read_json(marker_uri)
        return {"files": marker["files"], "uploaded_at": marker.get("uploaded_at")}
    fs, path = fs_and_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    files = {i.path[len(path) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
    if not files:
        raise UserInputError(f"nothing to download at {uri}")
    logger.warning("%s has no %s marker (not uploaded by jf-ray?); downloading what is there", uri, COMPLETE_MARKER)
    return {"files": files, "uploaded_at": None}


def _copy_listed(uri: str, files: dict[str, int], dest: Path) -> None:
    fs, path = fs_and_path(uri)
    for rel, size in files.items():
        local = dest / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{path}/{rel}", str(local), source_filesystem=fs)
        if local.stat().st_size != size:
            raise UserInputError(f"{uri}/{rel}: downloaded {local.stat().st_size} bytes, expected {size}")


def _replace_dir(tmp: Path, target: Path, listing: dict) -> None:
    # Several workers on one node may download the same checkpoint; the first rename wins, the others
    # find an identical copy in place.
    if target.exists():
        if _stamp(target) == listing:
            return
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if _stamp(target) != listing:
            raise


def _stamp(target: Path) -> dict | None:
    try:
        return json.loads((target / _LOCAL_STAMP).read_text())
    except (OSError, ValueError):
        return None


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("JF_CACHE_DIR", Path.home() / ".cache" / "jf_ray")) / "dirs"
