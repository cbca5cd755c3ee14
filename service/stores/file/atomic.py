"""Whole-file writes that a reader sees entirely or not at all, and a crash leaves harmless.

Every whole file the file store writes goes first to a temporary file in the same folder, which then takes the
old file's place in one step: a reader sees the old file or the new one, never half of one, and a process killed
mid-write leaves only a ``.NAME....tmp`` file behind that nothing reads (``remove_leftovers`` deletes it). The
step is an exchange of the two names where the system offers one (``swap_into_place`` says why), else
``os.replace``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

from service.errors import StoreWriteFailed

LEFTOVER_AGE_S = 60  # a temporary file older than this has no live writer (every write takes milliseconds)

# renameat2(2), which Python's os module does not wrap: glibc has it since 2.28 (``swap_into_place``).
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def replace_json(path: Path, data: object, *, durable: bool = True) -> None:
    """Put a readable JSON file of ``data`` in ``path``'s place in one step (fsynced first if ``durable``)."""
    replace_bytes(path, to_json_bytes(data, readable=True), durable=durable)


def replace_bytes(path: Path, content: bytes, *, durable: bool = True) -> None:
    """Put a file holding ``content`` in ``path``'s place in one step (fsynced first if ``durable``).

    Raises StoreWriteFailed, the previous contents intact, when the disk refuses.
    """
    temporary = None
    try:
        temporary = write_temporary(path, content, durable=durable)
        swap_into_place(temporary, path)
    except OSError as error:
        if temporary is not None:
            with suppress(OSError):
                os.unlink(temporary)
        message = f"could not write {path}: {error.strerror}; its previous contents are intact"
        raise StoreWriteFailed(message) from error


def check_writable(path: Path) -> None:
    """Make a temporary file beside ``path`` and delete it, as every write does; StoreWriteFailed naming the folder
    if the folder refuses (its permissions, a read-only or full disk)."""
    try:
        os.unlink(write_temporary(path, b"", durable=False))
    except OSError as error:
        raise StoreWriteFailed(
            f"no file can be written in {path.parent} ({error.strerror}): every purchase would fail. Make the folder "
            "writable for the service's user."
        ) from error


def create_if_absent(path: Path, data: object) -> None:
    """Create ``path`` holding ``data`` as readable JSON, unless it exists (also if someone creates it meanwhile)."""
    temporary = write_temporary(path, to_json_bytes(data, readable=True), durable=True)
    try:
        # link() fails if the name exists, so a file someone else created in between is never replaced.
        with suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def write_temporary(path: Path, content: bytes, *, durable: bool) -> str:
    """A new file beside ``path``, readable by all, holding ``content`` (fsynced if ``durable``): its name.

    The name is this thread's own: its process's token (process ids repeat across containers that share a
    volume) and its thread id. A missing folder is made (a new store's, or the keys' after a reset).
    """
    temporary = f"{path.parent}/.{path.name}.{_process_token(os.getpid())}-{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, flags, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask
        if os.write(fd, content) != len(content):
            raise OSError(errno.ENOSPC, "short write", temporary)
        if durable:
            os.fsync(fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    finally:
        os.close(fd)
    return temporary


@functools.cache
def _process_token(pid: int) -> str:
    # Made on first use in each process (keyed by pid, so a forked worker never reuses its master's).
    return f"{pid}-{uuid.uuid4().hex[:8]}"


def swap_into_place(temporary: str, path: Path) -> None:
    """Make ``path`` name the new file ``temporary`` in one step, and delete the file it named before.

    Why an exchange of the two names rather than ``os.replace``: a rename over an existing file makes ext4 write
    the new file's block at once (its ``auto_da_alloc`` guard against empty files after a crash) and free the
    old file's, and on a filesystem mounted with ``discard`` that free waits for the disk to trim the block,
    inside the lock (bench/RESULTS.md measures it). After an exchange, the old file is deleted before its data
    was ever given a block, so nothing is written or trimmed. Readers see the same thing either way: the old
    file or the new one, never half of one. The price is a power cut's, not a crash's: the newest contents
    reach the disk with the next writeback (docs/file-store.md, "Durability").
    """
    exchanged = _renameat2 is not None and (
        _renameat2(AT_FDCWD, os.fsencode(temporary), AT_FDCWD, os.fsencode(path), RENAME_EXCHANGE) == 0
    )
    if exchanged:
        with suppress(OSError):  # a file left here is harmless: remove_leftovers deletes it at the next start
            os.unlink(temporary)  # the old contents now
        return
    # No such file yet, or no exchange here (the filesystem, the kernel, a sandbox): os.replace does the job, and
    # reports any error that is not about exchanging.
    os.replace(temporary, path)


def remove_leftovers(candidates: list[Path]) -> list[Path]:
    """Delete the temporary files (and folders) among ``candidates`` old enough that no writer is live."""
    now = time.time()
    leftovers = []
    for candidate in candidates:
        with suppress(FileNotFoundError):
            if now - candidate.stat().st_mtime > LEFTOVER_AGE_S:
                if candidate.is_dir():  # the keys of a reset that was killed while deleting them
                    shutil.rmtree(candidate, ignore_errors=True)
                else:
                    candidate.unlink()
                leftovers.append(candidate)
    return sorted(leftovers)


def fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_file(path: Path) -> Any:
    """The JSON a whole file holds: OSError if it cannot be read, ValueError saying why it is not JSON."""
    content = path.read_bytes()
    if not content.strip():
        raise ValueError("the file is empty")
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"it is not valid JSON ({error})") from None


def to_json_bytes(data: object, *, readable: bool = False) -> bytes:
    """Readable (a file for people to read: spaces after the separators, and a final newline) or compact (one
    journal line, no newline)."""
    if readable:
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
