"""The errors of verification, in one place: each names the thing and the fix."""

from gpustack_offline.core.errors import BundleError


class Unverifiable(BundleError):
    """The cell's target cannot be reproduced here; the reason is said, never passed silently."""


class EgressError(BundleError):
    """The sinkhole could not be started or read, or the egress allowlist is malformed."""
