"""How a file is written: atomically (a temporary file, fsync, rename), with the mode the
umask gives so that collaborators read what a run wrote, and a failure named by its file."""

import errno
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any


def file_mode_mask() -> int:
    """The process's umask, read without changing it (os.umask sets it while reading, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str, content: bytes) -> None:
    """Writes via a temporary file and a rename, so a killed run never leaves a truncated file.

    The fsync before the rename makes this hold across a power cut too: the
    rename can reach the disk only after the content has. The file gets the
    mode the umask gives (mkstemp's own is 0600). A failure names the file.

    >>> write_bytes("runs/bp_adv/note.txt", b"hello")
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~file_mode_mask())
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}") from e
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    """One object per line; the whole file is rewritten atomically each time."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def os_error_reason(error: BaseException) -> str | None:
    """The strerror of an OSError in `error`'s chain, or of a full disk that orbax reports only in a message.

    >>> os_error_reason(RuntimeError("write failed"))  # None: no OSError in it
    """
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, OSError):
            return e.strerror or str(e)
        if "No space left on device" in str(e) or re.search(r"errno\W{0,3}28\b", str(e), re.IGNORECASE):
            return os.strerror(errno.ENOSPC)
        seen.add(id(e))
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None
