"""Can the job write where it was told to? Checked at the entry points before any work starts.

A job that learns at its first write, after minutes of base build or collection, that its bucket does not
exist or its credentials are wrong has lost that work. The entry points (``jobs/progressive.py`` and the
``jf-ray`` subcommands that write) call :func:`check_writable` first: it creates and deletes one probe
object (or file) at the location, the one test every object store and filesystem answers truthfully
(permissions, bucket policies, read-only mounts), and turns each failure into a
:class:`~jf_ray.errors.UserInputError` that names the location and the cause.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from jf_ray.errors import UserInputError
from jf_ray.storage.io import delete_file, write_bytes_atomic
from jf_ray.storage.uri import fs_and_path, is_local, join_uri, local_path

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".jf-preflight-"

# pyarrow reports S3 failures as OSError("... AWS Error <CODE> during <operation> operation: ...").
_AWS_CAUSES = {
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "ACCESS_DENIED": "access denied (wrong credentials, or they may not write to this bucket)",
    "INVALID_ACCESS_KEY_ID": "the server does not know the access key ID (wrong AWS_ACCESS_KEY_ID?)",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key ID (wrong AWS_SECRET_ACCESS_KEY?)",
    "EXPIRED_TOKEN": "the session token has expired (refresh AWS_SESSION_TOKEN)",
    "INVALID_TOKEN": "the session token is invalid (AWS_SESSION_TOKEN)",
    "NETWORK_CONNECTION": "cannot reach the S3 endpoint (check JF_S3_ENDPOINT / AWS_ENDPOINT_URL and the network)",
}
_NO_CREDENTIALS = (
    "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, use a profile in ~/.aws "
    "(AWS_PROFILE), or run where an instance profile / IRSA provides them"
)


def check_writable(uri: str, role: str = "output location") -> None:
    """Raise :class:`UserInputError` unless files can be created and deleted under directory ``uri``;
    ``role`` says which setting the location came from (``run_dir``, ``--out``)."""
    if is_local(uri):
        _check_local_dir(Path(local_path(uri)), uri, role)
    else:
        _check_object_store(uri, role)
    logger.debug("%s %s is writable", role, uri)


def check_writable_file(uri: str, role: str = "output file") -> None:
    """:func:`check_writable` for the directory a single output file will go to."""
    parent = str(Path(local_path(uri)).parent) if is_local(uri) else uri.rstrip("/").rsplit("/", 1)[0]
    check_writable(parent, role)


def _check_local_dir(path: Path, uri: str, role: str) -> None:
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise UserInputError(f"cannot write {role} {uri}: {existing} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot write {role} {uri}: cannot create {path}: {exc.strerror or exc}") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(
            f"cannot write {role} {uri}: cannot create files in {path}: {exc.strerror or exc}"
        ) from None


def _check_object_store(uri: str, role: str) -> None:
    if not _credentials_found():
        raise UserInputError(f"cannot write {role} {uri}: {_NO_CREDENTIALS}")
    filesystem, path = fs_and_path(uri)
    bucket = path.split("/", 1)[0]
    try:
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UserInputError(f"cannot write {role} {uri}: bucket {bucket!r} does not exist")
        probe = join_uri(uri, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        write_bytes_atomic(probe, b"")
        delete_file(probe, missing_ok=False)
    except OSError as exc:
        raise UserInputError(f"cannot write {role} {uri}: {_aws_cause(exc)}") from None


def _credentials_found() -> bool:
    """Whether the standard AWS chain (environment, ~/.aws, container or instance role) yields credentials:
    without them the S3 client sends unsigned requests and fails later with a less telling error."""
    import botocore.session

    return botocore.session.Session().get_credentials() is not None


def _aws_cause(exc: OSError) -> str:
    text = str(exc)
    match = re.search(r"AWS Error ([A-Z_]+)", text)
    if match and match.group(1) in _AWS_CAUSES:
        return _AWS_CAUSES[match.group(1)]
    return text.splitlines()[0] if text else type(exc).__name__
