"""The one way this project runs an external program: logged argument list, typed failure."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import CommandError

log = logging.getLogger("gpustack_offline")


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
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=None if env is None else dict(env),
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"{args[0]} is not installed or not on PATH ({what or 'needed here'})"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{what or args[0]} did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-25:])
        msg = f"{what or shlex.join(args)} failed (exit {proc.returncode})"
        if tail:
            msg += f":\n{tail}"
        if fix:
            msg += f"\nFix: {fix}"
        raise CommandError(msg)
    return proc
