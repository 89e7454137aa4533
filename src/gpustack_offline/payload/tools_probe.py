"""Ask a GPUStack release's own worker code what it would do with a tools archive on the target.

Run by the tool venv's Python (never imported by gpustack_offline):

    python tools_probe.py ARCHIVE '{"system": "linux", "arch": "arm64", "device": "cuda"}'

The worker decides what to download at start (`ToolsManager.prepare_tools()`) from three machine
facts only: `gpustack.utils.platform.system()`, `arch()` and `device()`. This probe answers them as
the target machine would, loads the archive with upstream's own `load_archive` into a scratch
folder, runs each `download_*` step with downloads turned into records, and prints JSON:

    {"llama_box_dir": NAME or null, "would_download": [URL_PATH, ...],
     "llama_box_asset": URL_PATH, "errors": [...]}

`llama_box_dir` is the folder the target's worker looks for (0.7 and later; 0.6 has one flat
folder). An empty `would_download` proves the archive is complete for that target.
`llama_box_asset` is the llama-box build the same worker fetches on a machine with no tools:
the one its device, toolkit version and chip pick (the environment answers the toolkit
questions, `CUDA_VERSION`, `CANN_VERSION`, `CANN_CHIP`, as the target's worker reads them).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any


class WouldDownload(Exception):
    pass


def main() -> int:
    archive, target = sys.argv[1], json.loads(sys.argv[2])
    from gpustack.utils import platform

    platform.system = lambda: target["system"]
    platform.arch = lambda: target["arch"]
    platform.device = lambda: target["device"]

    from gpustack.worker import tools_manager

    wanted: list[str] = []
    errors: list[str] = []

    def record(url_path: str, *args: object, **kwargs: object) -> None:
        wanted.append(str(url_path))
        raise WouldDownload(url_path)

    def manager_in(folder: Path) -> Any:
        """A ToolsManager of the target whose tools live in `folder`, downloads recorded."""
        bin_dir = folder / "bin"
        bin_dir.mkdir(parents=True)
        kwargs = {"data_dir": str(folder / "data")} if _accepts(tools_manager, "data_dir") else {}
        manager = tools_manager.ToolsManager(
            tools_download_base_url="http://downloads.invalid",
            bin_dir=str(bin_dir),
            device=target["device"] or None,
            **kwargs,
        )
        manager.third_party_bin_path = folder / "third_party_bin"
        manager.versions_file = manager.third_party_bin_path / "versions.json"
        manager._current_tools_version = {}
        manager._download_file = record
        return manager

    with tempfile.TemporaryDirectory() as scratch:
        # the build a worker of the target fetches when it has no tools
        bare = manager_in(Path(scratch) / "bare")
        try:
            bare.download_llama_box()
        except WouldDownload:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which fails the cell
            errors.append(f"download_llama_box with no tools: {exc}")
        picked = wanted.pop() if wanted else None

        manager = manager_in(Path(scratch) / "archive")
        manager.load_archive(archive)
        manager._current_tools_version = json.loads(manager.versions_file.read_text())
        for step in (manager.download_llama_box, manager.download_gguf_parser,
                     manager.download_fastfetch):  # fmt: skip
            try:
                step()
            except WouldDownload:
                pass
            except Exception as exc:  # noqa: BLE001 - reported to the caller, which fails the cell
                errors.append(f"{step.__name__}: {exc}")
        version = tools_manager.BUILTIN_LLAMA_BOX_VERSION
        naming = getattr(tools_manager, "get_llama_box_version_dir_name", None)
        llama_box_dir = naming(version) if naming else None
    result = {"llama_box_dir": llama_box_dir, "would_download": wanted, "errors": errors}
    print(json.dumps({**result, "llama_box_asset": picked}))
    return 0


def _accepts(module: object, name: str) -> bool:
    import inspect

    return name in inspect.signature(module.ToolsManager.__init__).parameters  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
