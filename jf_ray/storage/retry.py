"""Bounded, counted retries of whole-object storage operations on an object store.

Object stores fail a small fraction of requests in normal operation (503 SlowDown under load, 500
InternalError, connections reset mid-response). :func:`retrying` reruns a whole operation (a PUT of one
object, a read of one object, a listing) after such a transient error, with exponential backoff and jitter,
at most ``JF_STORAGE_ATTEMPTS`` times (default 6; waits of 0.25 s doubling, each between half and all of its
step: 4-8 s in all), and counts every retry in this process (:func:`retry_count`) so that stages can report
them. Errors that a retry
cannot fix (a missing object or bucket, denied access, bad credentials) are raised at once. When the attempts
are spent it raises :class:`StorageUnavailable`, which names the location, the operation and the last error.
Local files are not retried: a full or failing disk does not heal in seconds.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS_ENV = "JF_STORAGE_ATTEMPTS"
BASE_DELAY_ENV = "JF_STORAGE_RETRY_BASE_S"
DEFAULT_ATTEMPTS = 6
DEFAULT_BASE_DELAY_S = 0.25
MAX_DELAY_S = 8.0
# pyarrow reports S3 failures as OSError("... AWS Error <CODE> during <operation> operation: ...").
TRANSIENT_AWS_ERRORS = {
    "SLOW_DOWN",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "NETWORK_CONNECTION",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "REQUEST_TIME_TOO_SKEWED",
}
_AWS_CODE = re.compile(r"AWS Error ([A-Z_]+)")
# Bodiless answers (HEAD) come through as "AWS Error UNKNOWN (HTTP status 503)": 5xx and 429 are transient.
_TRANSIENT_STATUS = re.compile(r"HTTP status (5\d\d|429)\b")

_retries: Counter = Counter()
_lock = threading.Lock()


class StorageUnavailable(UserInputError):
    """An object store kept failing a request after every retry; the message names location and cause."""


class ShortRead(OSError):
    """An object read returned fewer bytes than the store said it holds (a connection cut mid-body)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: throttling, server errors, dropped connections, short reads."""
    if isinstance(exc, ShortRead):
        return True
    if not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    text = str(exc)
    match = _AWS_CODE.search(text)
    return bool(match and match.group(1) in TRANSIENT_AWS_ERRORS) or bool(_TRANSIENT_STATUS.search(text))


def retrying(operation: str, uri: str, func: Callable[[], T]) -> T:
    """``func()``, rerun after transient errors; ``operation`` and ``uri`` name it in logs and errors."""
    attempts = _setting(ATTEMPTS_ENV, DEFAULT_ATTEMPTS, int)
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return func()
        except OSError as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise _unavailable(operation, uri, attempts, time.monotonic() - start, exc) from exc
            _wait(operation, uri, exc, attempt, attempts)
    raise UserInputError(f"{ATTEMPTS_ENV} must be at least 1")


def retry_count() -> int:
    """Retries of storage operations made by this process so far."""
    with _lock:
        return sum(_retries.values())


def retry_counts() -> dict[str, int]:
    """Retries made by this process so far, by operation (``read``, ``write``, ``list``...)."""
    with _lock:
        return dict(_retries)


def _wait(operation: str, uri: str, exc: OSError, attempt: int, attempts: int) -> None:
    """Count the retry, say so, and back off."""
    delay = _backoff(attempt)
    with _lock:
        _retries[operation] += 1
    logger.warning(
        "storage: %s %s failed (%s); retry %d/%d in %.2fs",
        operation,
        uri,
        _first_line(exc),
        attempt,
        attempts - 1,
        delay,
    )
    time.sleep(delay)


def _backoff(attempt: int) -> float:
    """Exponential backoff with equal jitter: half the step fixed, half random (spreads out many clients)."""
    step = min(MAX_DELAY_S, _setting(BASE_DELAY_ENV, DEFAULT_BASE_DELAY_S, float) * 2 ** (attempt - 1))
    return step / 2 + random.uniform(0, step / 2)


def _unavailable(operation: str, uri: str, attempts: int, elapsed: float, exc: OSError) -> StorageUnavailable:
    return StorageUnavailable(
        f"storage unavailable: {operation} {uri} failed {attempts} times over {elapsed:.1f}s "
        f"(last error: {_first_line(exc)}); check the endpoint (JF_S3_ENDPOINT), the network and the "
        f"store's status, then rerun: finished work is kept and resumed ({ATTEMPTS_ENV} sets the attempts)"
    )


def _setting(name: str, default, cast):
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise UserInputError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise UserInputError(f"{name}={raw!r} must be positive")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
