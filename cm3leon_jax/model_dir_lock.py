"""One writer per model dir: a lock file that a second trainer on the same
model dir finds, so two runs never interleave checkpoints and metrics.

`model_dir/writer.lock` holds JSON {pid, host, started, command} (and the
process's start time on Linux, which tells a reused pid from the original).
It is created with O_CREAT | O_EXCL, so of two processes starting at once
exactly one gets it, and removed when the holder exits normally or on a
handled error. A lock found at start:
- this host, pid alive: refuse at once, naming the pid, host and command;
- this host, pid gone (killed, lost power): taken over with a one-line notice;
- another host: its liveness cannot be checked from here, so refuse with a
  message that names the host and says to delete the file if that run is gone
  (no heartbeat: a stale-by-age rule would let a slow but live run be joined).

Multi-host runs: only the chief (jax.process_index() == 0) takes the lock, as
only it writes the model dir's files.

Remote model dirs (gs://, via paths.py) have no exclusive create: the lock is
check, write, then read back (best effort: two runs started within the same
second can both pass); the same-host and other-host rules apply.

Re-entrant within a process: the CLI holds it around writing config.gin and
the trainer function it calls takes it again."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
import uuid
from typing import Callable, Dict, Optional

from cm3leon_jax import paths as paths_lib

LOCK_FILE = "writer.lock"

_held: Dict[str, int] = {}  # lock path -> nesting depth in this process


class ModelDirLockedError(RuntimeError):
    pass


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), None where
    /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _record(command: Optional[str]) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command or _command_line(),
            "pid_start": _proc_start(os.getpid()), "token": uuid.uuid4().hex}


def _command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if prog in ("cli.py", "__main__.py"):  # python -m cm3leon_jax.cli / cm3leon_jax.train
        prog = "cm3leon"
    return " ".join([prog] + sys.argv[1:])[:500]


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, "
            f"command: {holder.get('command')})")


def _read(path: str) -> Optional[bytes]:
    """The lock file's bytes; None when there is none."""
    if not paths_lib.is_url(path):
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    if not paths_lib.exists(path):
        return None
    with paths_lib.open(path, "rb") as f:
        return f.read()


def _parse(raw: bytes) -> dict:
    try:
        holder = json.loads(raw.decode())
        return holder if isinstance(holder, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _judge(path: str, raw: bytes) -> bool:
    """True when the lock in `raw` may be taken over (its process is gone);
    ModelDirLockedError when it may not."""
    holder = _parse(raw)
    me = socket.gethostname()
    if not holder:
        # A holder writes its record right after the exclusive create: an
        # empty file a few seconds old is a process that died in between.
        if paths_lib.is_url(path):
            return True
        try:
            age = time.time() - os.stat(path).st_mtime
        except OSError:
            age = 0.0
        if age > 5.0:
            return True
        raise ModelDirLockedError(f"{os.path.dirname(path)} is being locked by another process right now "
                                  f"({path} is still empty); wait and retry")
    if holder.get("host") != me:
        raise ModelDirLockedError(
            f"{os.path.dirname(path)} is being written by {_describe(holder)}; this host ({me}) cannot check "
            f"whether that run is still alive. If it is gone, delete {path} and rerun")
    pid = holder.get("pid")
    if isinstance(pid, int) and (pid != os.getpid()) and _alive(pid, holder.get("pid_start")):
        raise ModelDirLockedError(
            f"{os.path.dirname(path)} is being written by {_describe(holder)}; stop that run or wait for it "
            "to finish, or use another model dir")
    return True


def _create_local(path: str, body: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, body)
        os.fsync(fd)
    except OSError:  # a full disk: leave no empty lock behind
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return True


def _take_over_local(path: str, raw: bytes) -> None:
    """Removes the stale lock `raw` at `path`, unless another process took it
    over first (then its fresh lock is put back)."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    with open(aside, "rb") as f:
        if f.read() != raw:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    os.unlink(aside)


def acquire(model_dir: str, command: Optional[str] = None, say: Callable[[str], None] = None) -> Optional[str]:
    """Takes `model_dir`'s writer lock for this process; returns its path
    (None on a non-chief host of a multi-host run). ModelDirLockedError when
    another live process holds it."""
    import jax

    if jax.process_index() != 0:
        return None
    path = os.path.join(paths_lib.abspath(model_dir), LOCK_FILE)
    if path in _held:
        _held[path] += 1
        return path
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths_lib.makedirs(os.path.dirname(path))
    mine = _record(command)
    body = json.dumps(mine).encode()
    for _ in range(5):
        if paths_lib.is_url(path):
            raw = _read(path)
            if raw is None or _judge(path, raw):
                if raw is not None:
                    say(f"notice: taking over {path} from {_describe(_parse(raw))}, which is no longer running")
                with paths_lib.open(path, "wb") as f:
                    f.write(body)
                time.sleep(1.0)  # a writer that raced us has written by now: last one wins
                if _parse(_read(path) or b"").get("token") == mine["token"]:
                    break
            continue
        if _create_local(path, body):
            break
        raw = _read(path)
        if raw is not None and _judge(path, raw):
            holder = _parse(raw)
            say(f"notice: taking over {path} from "
                f"{_describe(holder) if holder else 'a process that died while taking it'}, "
                "which is no longer running")
            _take_over_local(path, raw)
    else:
        raise ModelDirLockedError(f"could not take {path}: other processes keep taking it; retry")
    _held[path] = 1
    return path


def release(path: Optional[str]) -> None:
    """Drops one hold of `path`; the outermost removes the file (if it is
    still this process's)."""
    if path is None or path not in _held:
        return
    _held[path] -= 1
    if _held[path] > 0:
        return
    del _held[path]
    raw = _read(path)
    if raw is not None and _parse(raw).get("pid") == os.getpid():
        with contextlib.suppress(Exception):  # noqa: BLE001 - exiting anyway; a restart takes it over
            paths_lib.remove(path)


@contextlib.contextmanager
def hold(model_dir: str, command: Optional[str] = None):
    """`with hold(model_dir):` the writer lock for the block's duration."""
    path = acquire(model_dir, command)
    try:
        yield path
    finally:
        release(path)


def writes_model_dir(fn=None, *, before: Optional[Callable[[], object]] = None):
    """Decorator for a trainer function with a `model_dir` keyword argument:
    the call holds that dir's writer lock (under @gin.configurable, which
    still sees `fn`'s own signature). `before` runs first (the decoder
    trainer's jax.distributed.initialize, which must precede the
    process-index query that picks the chief)."""
    if fn is None:
        return functools.partial(writes_model_dir, before=before)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if before is not None:
            before()
        with hold(kwargs["model_dir"]):
            return fn(*args, **kwargs)

    return wrapper
