"""The one way this project runs an external program: logged argument list, typed failure.

Every program runs in a session, and so a process group, of its own, ended whole (SIGKILL to the
group) when the run does not end normally: a timeout, an error or an interrupt here (Ctrl-C
reaches only the build, which then ends the group). On Linux the program also gets the kernel's
parent-death signal (`PR_SET_PDEATHSIG`, SIGKILL), so a build that is itself killed with SIGKILL,
which no handler sees, takes its running program (`download-tools`, `uv`, ...) with it instead
of leaving it orphaned; programs that program started itself are not covered by that signal.
The signal is tied to the thread that started the program; `run` waits for the program in that
same thread, so the thread outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gpustack_offline.core.errors import CommandError

log = logging.getLogger("gpustack_offline")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Looked up once here: the function that runs in the child between fork and exec must not
# import or load anything (other threads may hold the locks that would take).
_PRCTL = _load_prctl()


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A preexec_fn: SIGKILL this child when the thread that started it ends; if `parent` has
    already gone before the signal was armed, end now."""
    prctl = _PRCTL
    if prctl is None:
        return None
    kill, getpid, getppid = os.kill, os.getpid, os.getppid

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if getppid() != parent:
            kill(getpid(), signal.SIGKILL)

    return arm


def end_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child's whole process group (it leads it) and reap the child. Its output is
    not drained: a descendant that left the group may hold the pipe open."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = True,
    what: str | None = None,
    fix: str = "",
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never a shell string). On failure raise CommandError with the output's tail.

    `what` names the step for the message ("locking v0.7.1-…"), `fix` says what to do.
    """
    args = [str(a) for a in argv]
    log.info("$ %s", shlex.join(args))
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=None if env is None else dict(env),
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            # its own session and so process group, ended whole below; with no controlling
            # terminal, so it is never stopped for reading or writing one from the background
            start_new_session=True,
            preexec_fn=_dies_with(os.getpid()),
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"{args[0]} is not installed or not on PATH ({what or 'needed here'})"
        ) from exc
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        end_group(proc)
        raise CommandError(f"{what or args[0]} did not finish within {timeout:.0f}s") from exc
    except BaseException:  # an interrupt or an error here: the program must not outlive it
        end_group(proc)
        raise
    if proc.returncode != 0:
        tail = "\n".join((stdout or "").strip().splitlines()[-25:])
        msg = f"{what or shlex.join(args)} failed (exit {proc.returncode})"
        if tail:
            msg += f":\n{tail}"
        if fix:
            msg += f"\nFix: {fix}"
        raise CommandError(msg)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, None)
