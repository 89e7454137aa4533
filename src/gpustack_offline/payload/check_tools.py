"""Every tool bundled with the installed GPUStack runs, and is built for this machine.

Run in the target container by the installed release's Python (standard library and the
installed `gpustack` only, Python 3.8 and later):

    python -c "$(cat check_tools.py)" DEVICE

Prints one `ok` or `FAIL` line per tool, then the tools' versions.json; exits 1 if any failed or
fewer than three tools (llama-box among them) are there. On an accelerator's target (DEVICE is
not `cpu`: `cuda12.8`, `cann8.2.rc1-910b` …) a tool that stops at loading a shared library
counts as running: the vendor's driver and toolkit libraries (libcuda, libascendcl, libamdhip64
…) are the host's, and a container without the device lacks them.
"""

import json
import os
import platform
import subprocess
import sys

MACHINES = {"x86_64": 62, "aarch64": 183}  # ELF e_machine: EM_X86_64, EM_AARCH64


def main() -> int:
    import gpustack

    tools = os.path.join(os.path.dirname(gpustack.__file__), "third_party", "bin")
    machine = MACHINES[platform.machine()]
    driver_only = sys.argv[1] != "cpu"
    found = [
        p
        for p in (
            os.path.join(tools, "llama-box", "llama-box-default", "llama-box"),
            os.path.join(tools, "llama-box", "llama-box"),
            os.path.join(tools, "gguf-parser", "gguf-parser"),
            os.path.join(tools, "fastfetch", "fastfetch"),
        )
        if os.path.isfile(p)
    ]
    failed = not any("llama-box" in p for p in found) or len(found) < 3
    for path in found:
        name = os.path.relpath(path, tools)
        with open(path, "rb") as fh:
            head = fh.read(20)
        if head[:4] != b"\x7fELF":
            print(f"FAIL {name}: not an ELF program (it starts with {head[:16]!r})")
            failed = True
            continue
        kind = int.from_bytes(head[18:20], "little")
        if kind != machine:
            print(f"FAIL {name}: an ELF program for machine {kind}, this machine is {machine}")
            failed = True
            continue
        run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120)
        out = (run.stdout + run.stderr).strip()
        # An accelerator's build loads the vendor's libraries, which a container without the
        # device lacks.
        waits_for_driver = driver_only and "error while loading shared libraries: lib" in out
        ok = run.returncode == 0 or waits_for_driver
        failed |= not ok
        note = " (runs up to loading the vendor's libraries)" if waits_for_driver else ""
        print(f"{'ok' if ok else 'FAIL'} {name}{note}: {' | '.join(out.splitlines()[:6])}")
    with open(os.path.join(tools, "versions.json")) as fh:
        print(json.dumps(json.load(fh)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
