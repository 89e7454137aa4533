"""Atomic writes and hashing: a half-written file never carries its final name."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpustack_offline.core.errors import NO_SPACE, NOT_WRITABLE, Busy, DiskFullError, not_writable

CHUNK = 1 << 20


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# mkstemp/mkdtemp make private (0600/0700) entries; finished artifacts get the usual modes.
FILE_MODE = 0o644 & ~_umask()
DIR_MODE = 0o755 & ~_umask()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def scratch_file(final: Path, directory: Path, prefix: str) -> Iterator[Path]:
    """A temporary file in `directory`, removed on the way out whatever happens (renamed away
    first, if the body published it). A full disk becomes a `DiskFullError` naming `final`."""
    written = 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
        finally:
            written = size_of(tmp)
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise disk_full(final, written) from exc


def publish(tmp: Path, final: Path, mode_optional: bool = False) -> None:
    """fsync `tmp`, give it the usual mode and rename it to `final`. With `mode_optional`, a
    file system that refuses chmod (FAT32, exFAT: modes fixed at mount time) is no failure."""
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    try:
        os.chmod(tmp, FILE_MODE)
    except PermissionError:
        if not mode_optional:
            raise
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: Path, mode_optional: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place.

    A full disk becomes a `DiskFullError` naming `final`, after the temporary file is gone."""
    with scratch_file(final, final.parent, f".{final.name}.") as tmp:
        yield tmp
        publish(tmp, final, mode_optional)


def write_text(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success replace `final` with it.

    A full disk becomes a `DiskFullError` naming `final`, after the temporary folder is gone."""
    written = 0
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
        try:
            yield tmp
            os.chmod(tmp, DIR_MODE)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            written = size_of(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    except DiskFullError as exc:  # a file inside the folder: name the folder, count it all
        raise disk_full(final, max(written, exc.written)) from exc
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise disk_full(final, written) from exc


def size_of(path: Path) -> int:
    """Bytes under `path` (a file or a folder); 0 if it is gone."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def disk_full(final: Path, written: int) -> DiskFullError:
    """The error for a write that filled its disk: what, where, how much it needed, how much
    is free now that the partial file is gone, and what to do. `final` is the artifact's final
    name, or the folder it was going into when the name is not known yet (a blob's digest).

    Raise it `from` the OSError whose errno is in NO_SPACE, after removing the partial file."""
    folder = final if final.is_dir() else final.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    mount = folder.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    free = shutil.disk_usage(folder).free
    return DiskFullError(
        f"no space left on {mount} for {final}: {_mb(written)} of it was written before the "
        f"disk filled (removed again), so it needs more than that; {_mb(free)} is free there. "
        "Fix: free space there or point the folder's option (dist-dir, cache-dir) at a larger "
        "disk, then rerun; finished files are kept",
        final,
        written,
    )


def temp_names(final: Path) -> re.Pattern[str]:
    """The names `atomic_path(final)` and `atomic_dir(final)` give their temporary entries
    (mkstemp/mkdtemp put eight characters between prefix and suffix)."""
    return re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.part")


def remove_temps(final: Path) -> None:
    """Remove what killed writes of `final` left beside it, so a rerun reclaims their space.

    Only for an artifact one build writes at a time (a bundle): a concurrent writer of the same
    name would lose its temporary entry."""
    pattern = temp_names(final)
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link a cached file into a bundle (same bytes, no extra disk); copy across devices.
    True when linked. The link shares the cache's bytes: replace such a file, never write
    into it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        return False
    return True


@contextlib.contextmanager
def held(lock_file: Path, what: str, wait: bool = True, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock (flock) on `lock_file` for the body; the kernel drops it when the
    holder dies, however it dies, so a killed build never leaves a lock behind.

    The holder writes its pid and command into the file, so a refusal can name it, and an
    exclusive holder removes the file when it is done (no lock files are left lying about).
    With `wait=False` a held lock raises `Busy` naming the holder; `shared` locks exclude only
    an exclusive one."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"{what} is busy: {holder(lock_file)} holds {lock_file}") from None
        try:  # the file may have been removed by its last holder meanwhile: lock the new one
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv)[:300]}\n".encode(), 0)
        yield
    finally:
        if not shared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_file)
        os.close(fd)  # releases the lock


def try_exclusive(lock_file: Path) -> int | None:
    """An fd holding `lock_file` exclusively, or None when any other process holds it (shared
    or exclusive): for work that must only happen when nobody else is live."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def holder(lock_file: Path) -> str:
    """'pid N (command)' as the holder wrote it, or 'another process'."""
    try:
        pid, _, command = lock_file.read_text().strip().partition(" ")
    except OSError:
        return "another process"
    return f"pid {pid} ({command})" if pid.isdigit() else "another process"


def ensure_writable(folder: Path, option: str) -> None:
    """Fail before any work when `folder` (made if missing) cannot take a new file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno not in NOT_WRITABLE:
            raise
        raise not_writable(folder, exc, option) from None
