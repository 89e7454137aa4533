"""Files that run inside containers or on the target, never imported by the package: the
egress sinkhole, the audit hook, the tools probe, the stand-in device tools (fakes/: nvidia-smi,
npu-smi, amd-smi, hy-smi, mx-smi, mthreads-gmi, ixsmi, ppu-smi), and the scripts the
verification runs in a target container. `path` is the one way to ship one."""

from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    """The file or folder `name` of this folder, as a path a container can mount."""
    return Path(str(resources.files(__name__) / name))
