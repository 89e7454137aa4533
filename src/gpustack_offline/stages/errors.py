"""The stages' typed errors, in one place: each names the thing that went wrong and the fix.

Every one is a `BundleError` (core/errors.py), so the command line prints its message alone.
"""

from __future__ import annotations

from gpustack_offline.core.errors import BundleError


class RunnerDataError(BundleError):
    """The runner data of a GPUStack 2.x version is missing, malformed or cannot be made."""


class NoRunnerError(BundleError):
    """No runner image of upstream's list fits the requested backend, service and platform."""
