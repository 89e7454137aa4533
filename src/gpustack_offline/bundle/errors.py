"""The errors of the bundle stages, in one place: each names the thing and the fix."""

from gpustack_offline.core.errors import BundleError


class CompareError(BundleError):
    """A bundle that cannot be compared: no manifest, or not a bundle at all."""


class DeltaError(BundleError):
    """A base a delta cannot be made against: not an inventory, a bundle or a manifest."""


class ReleaseError(BundleError):
    """A bundle that cannot go into a release as it is, or a broken set of index entries."""


class SbomError(BundleError):
    """A bundle whose SBOM cannot be made, or an SBOM that does not validate."""


class SignatureError(BundleError):
    """A bundle that cannot be signed, or whose signature does not check out."""


class VolumeError(BundleError):
    """A bad volume size, or a tar that cannot be split where asked."""
