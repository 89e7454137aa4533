"""One typed error per thing that can go wrong, each with a message a release engineer can act on.

Every error the pipeline raises on purpose is a `BundleError`; the task and session wiring print its
message (no traceback) and exit non-zero. Anything else is a bug in this project.
"""

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


class IntegrityError(BundleError):
    """Bytes that do not match their recorded digest."""


class CommandError(BundleError):
    """An external program failed."""


class VerifyError(BundleError):
    """A bundle failed verification."""


class ToolsError(BundleError):
    """A tools archive that cannot be made, or would not be found by the target's worker."""


class DiskFullError(BundleError):
    """A filesystem ran out of space (or quota) while an artifact was being written."""

    def __init__(self, message: str, path: Path, written: int) -> None:
        super().__init__(message)
        self.path = path  # the artifact's final name
        self.written = written  # bytes written before the disk filled
