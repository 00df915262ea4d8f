"""Storage URIs -> ``pyarrow.fs`` filesystems, so one code path serves ``file://``, bare paths and ``s3://``.

S3 settings come from the environment, as on any AWS-style cluster: credentials from the standard
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or ``~/.aws``), the endpoint of an
S3-compatible server (MinIO, Ceph, moto) from ``JF_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Retries: the filesystem :func:`fs_and_path` hands out retries each S3 request itself (the AWS SDK's standard
strategy, ``JF_S3_MAX_ATTEMPTS`` attempts, default 5), for callers that use it directly (Ray Train, Ray Data).
jf-ray's own whole-object operations (``jf_ray.storage.io``) ask for one without SDK retries
(``sdk_retries=False``) and retry whole operations themselves, counted (``jf_ray.storage.retry``).
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from jf_ray.errors import UserInputError
from jf_ray.storage.retry import retrying

ENDPOINT_ENV_VARS = ("JF_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
DEFAULT_REGION = "us-east-1"
SDK_ATTEMPTS_ENV = "JF_S3_MAX_ATTEMPTS"
DEFAULT_SDK_ATTEMPTS = 5


def fs_and_path(uri: str, sdk_retries: bool = True) -> tuple[pafs.FileSystem, str]:
    """``file:///a/b`` or ``/a/b`` or ``a/b`` -> (LocalFileSystem, "/abs/a/b"); ``s3://bkt/k`` -> (S3, "bkt/k").

    ``sdk_retries=False``: an S3 filesystem that tries each request once (the caller retries)."""
    if not isinstance(uri, str) or not uri:
        raise UserInputError(f"storage location must be a non-empty URI or path, got {uri!r}")
    scheme = _scheme(uri)
    if scheme == "":
        return _local_fs(), os.path.abspath(os.path.expanduser(uri))
    if scheme == "file":
        path = urlparse(uri).path
        if not path.startswith("/"):
            raise UserInputError(f"file URI must be absolute (file:///abs/path): {uri}")
        return _local_fs(), path
    if scheme == "s3":
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise UserInputError(f"s3 URI needs a bucket (s3://bucket/key): {uri}")
        attempts = _sdk_attempts() if sdk_retries else 1
        return _s3_fs(*_s3_settings(), attempts), (parsed.netloc + parsed.path).rstrip("/")
    raise UserInputError(f"unsupported storage scheme {scheme!r} in {uri}; use file:// or s3://")


def join_uri(base: str, *parts: str) -> str:
    """Append path parts with ``/`` (URIs and POSIX paths alike); empty parts are skipped."""
    out = base.rstrip("/") if base not in ("/", "file:///") else base
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def exists(uri: str) -> bool:
    if is_local(uri):
        fs, path = fs_and_path(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    fs, path = fs_and_path(uri, sdk_retries=False)
    return retrying("stat", uri, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def is_local(uri: str) -> bool:
    return _scheme(uri) in ("", "file")


def local_path(uri: str) -> str:
    """The local path of a ``file://`` URI or bare path; error for remote URIs."""
    if not is_local(uri):
        raise UserInputError(f"expected a local path or file:// URI, got {uri}")
    return fs_and_path(uri)[1]


def _scheme(uri: str) -> str:
    # Windows drive letters are not a concern here; a bare path has no "://".
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


@functools.lru_cache(maxsize=1)
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def _s3_settings() -> tuple[str | None, str | None, str, tuple[str | None, str | None, str | None]]:
    endpoint = next((os.environ[k] for k in ENDPOINT_ENV_VARS if os.environ.get(k)), None)
    scheme = None
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        scheme, endpoint = parsed.scheme, parsed.netloc
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    creds = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    return endpoint, scheme, region, creds  # type: ignore[return-value]


def _sdk_attempts() -> int:
    raw = os.environ.get(SDK_ATTEMPTS_ENV) or str(DEFAULT_SDK_ATTEMPTS)
    if not raw.isdigit() or int(raw) < 1:
        raise UserInputError(f"{SDK_ATTEMPTS_ENV}={raw!r} must be a whole number >= 1")
    return int(raw)


@functools.lru_cache(maxsize=8)
def _s3_fs(endpoint: str | None, scheme: str | None, region: str, creds: tuple, attempts: int) -> pafs.S3FileSystem:
    # Keyed on the env-derived settings so that a changed endpoint/credential (tests, key rotation) gets a new
    # client while repeated calls reuse one connection pool.
    access_key, secret_key, session_token = creds
    kwargs = {"region": region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        kwargs.update(endpoint_override=endpoint, scheme=scheme or "https")
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    return pafs.S3FileSystem(**kwargs)
