"""List the Python files a GPUStack release loads to run `gpustack start`, for the site's
install to byte-compile exactly those.

Run by the tool venv's Python (never imported by gpustack_offline):

    python start_modules.py

It imports upstream's start command module (`gpustack.cmd.start`, which imports the server and
the worker) and prints one JSON list: every loaded module's source file under the venv's
site-packages, as a path relative to it, sorted. The target's release holds the same pure
Python files for the same version (native modules are not compiled anyway); a file the list
names that the target lacks is skipped there.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig


def main() -> int:
    import gpustack.cmd.start  # noqa: F401  (loaded for its imports)

    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    found = set()
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        real = os.path.realpath(source)
        if real.startswith(site + os.sep):
            found.add(os.path.relpath(real, site).replace(os.sep, "/"))
    print(json.dumps(sorted(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
