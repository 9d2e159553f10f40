"""One writer per model dir (issue 26): a second trainer on a dir that a live
process writes refuses at once naming its pid and host; a lock left by a dead
process is taken over; a lock from another host is refused with the way to
remove it."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMALL
from cm3leon_jax import model_dir_lock as lock_lib


def _plant(model_dir, pid, host=None, **extra):
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, lock_lib.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(dict({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00",
                        "command": "cm3leon train --model_dir=elsewhere"}, **extra), f)
    return path


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_writer_is_refused_naming_pid_host_and_command(tmp_path):
    live = os.getppid()  # the process that started pytest: alive, and not this one
    _plant(tmp_path, live)
    with pytest.raises(lock_lib.ModelDirLockedError) as err:
        lock_lib.acquire(str(tmp_path))
    msg = str(err.value)
    assert f"pid {live} on host {socket.gethostname()}" in msg and "cm3leon train --model_dir=elsewhere" in msg
    assert json.load(open(tmp_path / lock_lib.LOCK_FILE))["pid"] == live  # untouched


def test_dead_writers_lock_is_taken_over_with_a_notice_and_released(tmp_path, capsys):
    gone = dead_pid()
    _plant(tmp_path, gone)
    with lock_lib.hold(str(tmp_path), command="test") as path:
        held = json.load(open(path))
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"] == "test"
        assert {"started", "pid_start"} <= set(held)
        with lock_lib.hold(str(tmp_path)):  # re-entrant: the CLI and the trainer function both take it
            pass
        assert os.path.exists(path)
    assert not os.path.exists(path)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and f"pid {gone}" in notices[0] and "no longer running" in notices[0]


def test_a_reused_pid_is_not_taken_for_the_writer(tmp_path):
    # the pid is alive, but it started at another time than the lock's writer did
    _plant(tmp_path, os.getppid(), pid_start="1")
    path = lock_lib.acquire(str(tmp_path))
    lock_lib.release(path)
    assert not os.path.exists(path)


def test_another_hosts_lock_is_refused_with_how_to_remove_it(tmp_path):
    path = _plant(tmp_path, 4242, host="tpu-vm-7")
    with pytest.raises(lock_lib.ModelDirLockedError) as err:
        lock_lib.acquire(str(tmp_path))
    assert "pid 4242 on host tpu-vm-7" in str(err.value) and f"delete {path}" in str(err.value)


_RACER = """
import sys, time
from cm3leon_jax import model_dir_lock as m
try:
    path = m.acquire(sys.argv[1])
except m.ModelDirLockedError as e:
    print("refused", e, flush=True)
    sys.exit(3)
print("got", flush=True)
time.sleep(float(sys.argv[2]))
m.release(path)
"""


def test_of_two_processes_starting_together_exactly_one_writes(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), "20"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.poll() is not None for p in procs):
        time.sleep(0.1)
    finished = [p for p in procs if p.poll() is not None]
    assert len(finished) == 1 and finished[0].returncode == 3
    assert "refused" in finished[0].stdout.read()
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("which", ["decoder", "vqgan", "clip"])
def test_each_trainer_refuses_a_live_writers_dir_before_writing_anything(tmp_path, which):
    from cm3leon_jax.train import clip_trainer, trainer, vqgan_trainer

    live = os.getppid()
    _plant(tmp_path, live)
    fn = {"decoder": lambda: trainer.train(model_dir=str(tmp_path), mixture_or_task_name="synthetic_lm",
                                           task_feature_lengths={"targets": 64}, train_steps=2, batch_size=2),
          "vqgan": lambda: vqgan_trainer.train_vqgan(model_dir=str(tmp_path), train_steps=2),
          "clip": lambda: clip_trainer.train_clip(model_dir=str(tmp_path), train_steps=2)}[which]
    t0 = time.perf_counter()
    with pytest.raises(lock_lib.ModelDirLockedError, match=f"pid {live} on host {socket.gethostname()}"):
        fn()
    assert time.perf_counter() - t0 < 5.0
    assert os.listdir(tmp_path) == [lock_lib.LOCK_FILE]


@pytest.mark.parametrize("command", [
    ["train", *SMALL, "--gin.TRAIN_STEPS=2"],
    ["tokenizer", "train-image", "--gin_file=gin/vqgan_shapes.gin"],
    ["clip", "train", "--gin_file=gin/clip_shapes.gin"],
])
def test_cli_refuses_with_one_line_and_exit_1(tmp_path, command):
    live = os.getppid()
    _plant(tmp_path, live)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", *command, f"--model_dir={tmp_path}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert f"is being written by pid {live} on host {socket.gethostname()}" in errors[0]
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == [lock_lib.LOCK_FILE]  # not even config.gin was written


def test_a_url_model_dir_is_locked_by_write_and_read_back():
    tf = pytest.importorskip("tensorflow")
    url = f"ram://locks/run-{os.getpid()}"
    path = lock_lib.acquire(url)
    assert path == url + "/" + lock_lib.LOCK_FILE
    assert json.loads(tf.io.gfile.GFile(path).read())["pid"] == os.getpid()
    lock_lib.release(path)
    assert not tf.io.gfile.exists(path)
    with tf.io.gfile.GFile(path, "w") as f:  # a live writer's lock on the URL
        f.write(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x", "command": "y"}))
    with pytest.raises(lock_lib.ModelDirLockedError, match=f"pid {os.getppid()}"):
        lock_lib.acquire(url)
