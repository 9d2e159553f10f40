"""A demo stage's command as a child process: `python -m cm3leon_jax.cli ...`,
its output streamed to the terminal (prefixed with the stage's name) and to the
stage's log, and SIGTERM to the child when the demo dies."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from typing import List, Mapping, Optional


def cli_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "cm3leon_jax.cli", *args]


def _die_with_parent():
    """Child processes get SIGTERM when the demo dies (even by SIGKILL), so
    a killed demo leaves no trainer running on its model dir; the trainers
    checkpoint on SIGTERM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def shown(cmd: List[str], env: Optional[Mapping[str, str]] = None) -> str:
    """The command as a user would type it: `[VAR=value ...] cm3leon ...`."""
    if cmd[1:3] == ["-m", "cm3leon_jax.cli"]:
        cmd = ["cm3leon"] + cmd[3:]
    prefix = [f"{k}={shlex.quote(str(v))}" for k, v in sorted((env or {}).items())]
    return " ".join(prefix + [shlex.quote(c) for c in cmd])


class Command:
    """A stage's command as a child process. Its output lines go to the
    terminal prefixed with the stage name (two stages may run at once) and
    to demo_out/logs/STAGE.log. `env`: variables set for this child only
    (shown before the command)."""

    def __init__(self, stage: str, cmd: List[str], log_dir: str, prefix: bool,
                 env: Optional[Mapping[str, str]] = None):
        import threading

        os.makedirs(log_dir, exist_ok=True)
        self.stage, self.shown = stage, shown(cmd, env)
        print(f"  [{stage}] $ {self.shown}", flush=True)
        self.log = open(os.path.join(log_dir, f"{stage}.log"), "a", encoding="utf-8")
        self.log.write(f"$ {self.shown}\n")
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **{k: str(v) for k, v in (env or {}).items()})
        self.proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", bufsize=1,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.prefix = f"  [{stage}] " if prefix else "  "
        self.tail: List[str] = []
        self._last_bar = 0.0
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            # progress bars redraw with carriage returns: show their latest state as a line
            line = line.rstrip("\n").split("\r")[-1]
            if "%|" in line:  # a tqdm bar (written whole at each update into a pipe): every 10 s at most
                if time.time() - self._last_bar < 10 and not line.split("%|")[0].endswith("100"):
                    continue
                self._last_bar = time.time()
            if line.strip():
                self.tail = (self.tail + [line])[-20:]
                print(self.prefix + line, flush=True)

    def wait(self) -> None:
        rc = self.proc.wait()
        self.thread.join()
        self.log.close()
        if rc != 0:
            raise RuntimeError(f"stage {self.stage}: `{self.shown}` failed with exit status {rc} (its output: "
                               f"{self.log.name}); fix the cause and rerun `cm3leon demo` (finished stages are "
                               "kept)")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the trainers checkpoint on SIGTERM
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
