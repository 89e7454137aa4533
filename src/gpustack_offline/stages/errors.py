"""The stages' typed errors, in one place: each names the thing that went wrong and the fix.

Every one is a `BundleError` (core/errors.py), so the command line prints its message alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpustack_offline.core.errors import BundleError


class RunnerDataError(BundleError):
    """The runner data of a GPUStack 2.x version is missing, malformed or cannot be made."""


class NoRunnerError(BundleError):
    """No runner image of upstream's list fits the requested backend, service and platform."""


class ImageError(BundleError):
    """An image a cell cannot have: unknown device, missing pin, unexportable layers."""


class RegistryError(BundleError):
    """A registry that cannot be reached, or answered something this client cannot use."""


class BadReference(RegistryError):
    """An image reference that does not parse."""


class AuthError(RegistryError):
    """A registry or its token service refused us, or wants credentials we do not have."""


class ImageNotFound(RegistryError):
    """The registry has no such tag, digest or repository."""


class PlatformError(RegistryError):
    """The image is not published for the platform asked for."""

    def __init__(self, message: str, available: Sequence[Any]) -> None:
        super().__init__(message)
        self.available = tuple(available)  # the registry.Platform values the image has


class HubError(BundleError):
    """The model source (the Hugging Face hub, ModelScope, or a site mirror of either) cannot be
    asked, or has no such repository, revision or file."""
