"""Telling a file system fault (a full disk, a quota, an I/O error, a
read-only mount) from any other error, wherever a library reports it: an
OSError, or an OSError raised under another exception (Beam re-raises a
worker's error as RuntimeError("OSError: [Errno 28] ...")), or tensorstore's
ValueError("... [os_error_code='28']"). Checkpoint saves (checkpoints.py)
and `prepare`'s shard writes turn such a fault into one line naming what
could not be written; anything else keeps its traceback."""
from __future__ import annotations

import errno
import logging
import os
import re
from typing import Optional, Tuple

# tensorstore: "[os_error_code='28']"; an OSError's text re-raised by Beam: "[Errno 28]"
_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")
_WORDS = ("No space left on device", "Disk quota exceeded", "Input/output error", "Read-only file system")
SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_fault(e: Optional[BaseException]) -> Optional[Tuple[str, Optional[int]]]:
    """(cause as "[Errno N] text", N) when `e`, or an exception it was raised
    from, is a file system error; None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}", e.errno
        m = _CODE.search(str(e))
        if m:
            code = int(m.group(1) or m.group(2))
            return f"[Errno {code}] {os.strerror(code)}", code
        if any(w in str(e) for w in _WORDS):
            return str(e).splitlines()[0][:300], None
        e = e.__cause__ or e.__context__
    return None


def mentions_disk_fault(text: str) -> bool:
    """A log line that reports a file system error (see `disk_fault`)."""
    return bool(_CODE.search(text)) or any(w in text for w in _WORDS)


def advice(code: Optional[int]) -> str:
    return "free space and rerun" if code in SPACE else "fix the file system and rerun"


class DropDiskFaultRecords(logging.Filter):
    """Drops a library's ERROR records of a disk fault (with the traceback of
    each thread or worker that met it), for a caller that reports the fault
    once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and record.exc_info[1] is not None and disk_fault(record.exc_info[1]) is not None:
            return False
        return not mentions_disk_fault(record.getMessage())


def quiet(logger_name: str) -> None:
    """Adds `DropDiskFaultRecords` to the logger `logger_name` (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropDiskFaultRecords) for f in logger.filters):
        logger.addFilter(DropDiskFaultRecords())
