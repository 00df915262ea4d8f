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

from jf_ray.errors import UserInputError
from jf_ray.storage.io import delete_file, write_bytes_atomic
from jf_ray.storage.retry import StorageUnavailable
from jf_ray.storage.uri import fs_and_path, is_local, join_uri, local_path

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".jf-preflight-"

# pyarrow reports S3 failures as OSError("... AWS Error <CODE> during <operation> operation: ...").
_AWS_CAUSES = {
    "NO_SUCH_BUCKET": "bucket {bucket!r} does not exist",
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
    _check_directory(uri, f"{role} {uri}")


def check_writable_file(uri: str, role: str = "output file") -> None:
    """:func:`check_writable` for the directory a single output file will go to."""
    parent = str(Path(local_path(uri)).parent) if is_local(uri) else uri.rstrip("/").rsplit("/", 1)[0]
    _check_directory(parent, f"{role} {uri}")


def _check_directory(uri: str, named: str) -> None:
    """``named``: the setting and location as the user gave them, for the message."""
    if is_local(uri):
        _check_local_dir(Path(local_path(uri)), named)
    else:
        _check_object_store(uri, named)
    logger.debug("%s is writable", named)


def _check_local_dir(path: Path, named: str) -> None:
    # The probe goes into the deepest directory that exists: the check itself creates nothing that stays
    # (a job that then fails to join its cluster leaves no empty run directory behind).
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise UserInputError(f"cannot write {named}: {existing} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(
            f"cannot write {named}: cannot create files in {existing}: {exc.strerror or exc}"
        ) from None


def _check_object_store(uri: str, named: str) -> None:
    if not _credentials_found():
        raise UserInputError(f"cannot write {named}: {_NO_CREDENTIALS}")
    # The probe write, not a HEAD of the bucket: HEAD answers 403 without a body for wrong keys and
    # missing buckets alike, a PUT names the cause.
    probe = join_uri(uri, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        write_bytes_atomic(probe, b"")
        delete_file(probe, missing_ok=False)
    except OSError as exc:
        raise UserInputError(f"cannot write {named}: {_aws_cause(exc, uri)}") from None
    except StorageUnavailable as exc:  # transient errors on every retry: the store is down or unreachable
        raise UserInputError(f"cannot write {named}: {exc}") from None


def _credentials_found() -> bool:
    """Whether the standard AWS chain (environment, ~/.aws, container or instance role) yields credentials:
    without them the S3 client sends unsigned requests and fails later with a less telling error."""
    import botocore.session

    return botocore.session.Session().get_credentials() is not None


def _aws_cause(exc: OSError, uri: str) -> str:
    text = str(exc)
    match = re.search(r"AWS Error ([A-Z_]+)", text)
    if match and match.group(1) in _AWS_CAUSES:
        return _AWS_CAUSES[match.group(1)].format(bucket=fs_and_path(uri)[1].split("/", 1)[0])
    return text.splitlines()[0] if text else type(exc).__name__
