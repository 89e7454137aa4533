"""One typed error per thing that can go wrong, each with a message a release engineer can act on.

Every error the pipeline raises on purpose is a `BundleError`; the task and session wiring print its
message (no traceback) and exit non-zero. Anything else is a bug in this project.
"""

import errno
import os
from collections.abc import Mapping
from pathlib import Path


class BundleError(Exception):
    """A failure the user can fix; the message names the thing and the fix."""


class CellError(BundleError):
    """An unknown, impossible or malformed cell id or selection."""


class OptionError(BundleError):
    """An unknown option key or a bad option value."""


class LockError(BundleError):
    """A lock file is missing, stale, or cannot be made for the cell."""


class WheelError(BundleError):
    """A wheel that cannot be installed on the target, or an sdist that cannot be built."""


class CudaGateError(WheelError):
    """The wheel set needs a newer CUDA major than the cell's driver floor."""


class ModelError(BundleError):
    """An unknown or malformed model in the models data, or a model source not supported yet."""


class IntegrityError(BundleError):
    """Bytes that do not match their recorded digest."""


class CommandError(BundleError):
    """An external program failed."""


class VerifyError(BundleError):
    """A bundle failed verification."""


class ToolsError(BundleError):
    """A tools archive that cannot be made, or would not be found by the target's worker."""


class DownloadError(BundleError):
    """A download that still failed after every retry, or that the server refused outright."""


class HTTPStatusError(DownloadError):
    """The server answered a status that retrying does not change (404, 403, ...)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DiskFullError(BundleError):
    """A filesystem ran out of space (or quota) while an artifact was being written."""

    def __init__(self, message: str, path: Path, written: int) -> None:
        super().__init__(message)
        self.path = path  # the artifact's final name
        self.written = written  # bytes written before the disk filled


class Busy(BundleError):
    """Another live process holds a lock this one needs without waiting."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
DEBUG_ENV = "GPUSTACK_OFFLINE_DEBUG"  # set to 1: the top-level handler re-raises (traceback)


def debugging(env: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if env is None else env).get(DEBUG_ENV, "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def not_writable(path: Path, exc: OSError, option: str = "") -> BundleError:
    """The error for a path this build cannot write: which, why, and which option moves it."""
    reason = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
    where = f" (the {option} option)" if option else ""
    move = f" or point {option} at a writable folder" if option else ""
    return BundleError(
        f"cannot write to {path}{where}: {reason}. Fix: make it writable for this user{move}, "
        "then rerun"
    )


def describe(exc: BaseException) -> str:
    """One message for anything that reaches the command line: a `BundleError` as it is; an
    environment fault (interrupt, file system, Docker) named with its fix; anything else as a
    bug to report, with the switch that shows its traceback."""
    if isinstance(exc, BundleError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; finished files are kept and temporary ones go at the next run: rerun"
    if isinstance(exc, OSError) and exc.errno is not None:
        target = Path(os.fsdecode(exc.filename)) if exc.filename else None
        if exc.errno in NOT_WRITABLE and target:
            return str(not_writable(target, exc))
        if exc.errno in NO_SPACE:
            where = f" on the disk of {target}" if target else ""
            return f"no space left{where}. Fix: free space there or move dist-dir or cache-dir"
        what = f"{target}: " if target else ""
        return f"{what}{exc.strerror or exc}. Fix: check that path and its file system, then rerun"
    kind = type(exc)
    if kind.__module__.startswith("docker"):
        return (
            f"Docker: {exc}. Fix: check that the Docker daemon runs and this user may use it "
            "(`docker info`)"
        )
    return (
        f"internal error ({kind.__name__}: {exc}); this is a bug in gpustack-offline. Rerun "
        f"with {DEBUG_ENV}=1 for the traceback and report it"
    )
