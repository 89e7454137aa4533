"""Stop every gpustack process in the container (server, worker, their children): TERM, then
KILL, then wait until the ports are free. By command line, as setproctitle renames the worker.

Run in the target container by its python3 (standard library only, Python 3.8 and later):

    python3 -c "$(cat stop_gpustack.py)" PORT...
"""

from __future__ import annotations  # list[int] below, on Python 3.8 too

import contextlib
import os
import signal
import socket
import sys
import time


def ours() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if int(pid) != os.getpid() and b"gpustack" in fh.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    ports = [int(p) for p in sys.argv[1:]]
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        for pid in ours():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        for _ in range(wait):
            if not ours() and not any(listening(p) for p in ports):
                sys.exit(0)
            time.sleep(1)
    sys.exit(f"gpustack processes {ours()} or ports {sys.argv[1:]} survive SIGKILL")


if __name__ == "__main__":
    main()
