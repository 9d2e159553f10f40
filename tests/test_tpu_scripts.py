"""tpu/create_vm.sh, tpu/setup.sh, tpu/launch.sh: syntax, --help, --dry_run, the
gcloud argument lists they build (a fake `gcloud` on PATH records them), the
scripts they send to the workers (syntax-checked; launch.sh's is run for two
fake workers), and the errors for missing or contradictory arguments. No
Google Cloud is reached: the fake gcloud never leaves this machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("create_vm.sh", "setup.sh", "launch.sh")

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """Fake gcloud: appends its arguments (one JSON list a line) to $FAKE_GCLOUD_LOG.
    `compute tpus tpu-vm ssh NAME --worker=W --command=SCRIPT` runs SCRIPT with bash for each
    fake worker (FAKE_WORKERS of them, HOME=$FAKE_HOME) when FAKE_GCLOUD_EXEC=1;
    `compute tpus tpu-vm scp SRC NAME:DST` copies SRC to $FAKE_HOME/DST."""
    import json, os, shutil, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and os.environ.get("FAKE_HOME"):
        src, dst = args[4], args[5].split(":", 1)[1]
        shutil.copy(src, os.path.join(os.environ["FAKE_HOME"], dst))
    if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and os.environ.get("FAKE_GCLOUD_EXEC") == "1":
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        n = int(os.environ.get("FAKE_WORKERS", "2"))
        workers = range(n) if opts["worker"] == "all" else [int(opts["worker"])]
        procs = []
        for w in workers:
            env = dict(os.environ, FAKE_WORKER=str(w), HOME=os.environ["FAKE_HOME"])
            procs.append(subprocess.Popen(["bash", "-c", opts["command"]], env=env, cwd=env["HOME"]))
        sys.exit(max(p.wait() for p in procs))
''')

# the TPU metadata server's answer for `agent-worker-number`
FAKE_CURL = "#!/usr/bin/env bash\necho \"$FAKE_WORKER\"\n"


@pytest.fixture
def fake(tmp_path):
    """PATH with the fake gcloud (and curl); the recorded calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "curl").write_text(FAKE_CURL)
    for f in ("gcloud", "curl"):
        os.chmod(bin_dir / f, 0o755)
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "gcloud_calls.jsonl"

    class Fake:
        path = tmp_path
        fake_home = home

        def env(self, **extra):
            env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "DRY_RUN"}
            env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log), FAKE_HOME=str(home))
            env.update(extra)
            return env

        def run(self, script, *args, env=None, cwd=None):
            t0 = time.time()
            proc = subprocess.run(["bash", os.path.join(REPO, "tpu", script), *args], env=env or self.env(),
                                  cwd=cwd or str(tmp_path), capture_output=True, text=True, timeout=120)
            assert time.time() - t0 < 120
            return proc

        def calls(self):
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Fake()


def _ok(proc):
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _error(proc, message):
    assert proc.returncode == 2, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert message in proc.stderr, proc.stderr
    assert "--help" in proc.stderr
    return proc


def _command_of(call):
    return next(a[len("--command="):] for a in call if a.startswith("--command="))


def _bash_n(script_text):
    proc = subprocess.run(["bash", "-n"], input=script_text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------- all three


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_mode(script):
    path = os.path.join(REPO, "tpu", script)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(path, os.X_OK), f"{script} is not executable"
    text = open(path).read()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(fake, script):
    for flag in ("--help", "-h"):
        proc = _ok(fake.run(script, flag))
        assert proc.stdout.startswith(f"Usage: tpu/{script}")
        assert "--dry_run" in proc.stdout and "--zone" in proc.stdout
    assert fake.calls() == []


@pytest.mark.parametrize("script,args", [
    ("create_vm.sh", ["--zone=z"]),
    ("setup.sh", ["--zone=z", "--local"]),
    ("launch.sh", ["--zone=z", "--", "true"]),
])
def test_name_is_required(fake, script, args):
    _error(fake.run(script, *args), "the TPU VM name is required")
    assert fake.calls() == []


@pytest.mark.parametrize("script,args", [
    ("create_vm.sh", ["n1"]),
    ("setup.sh", ["n1", "--local"]),
    ("launch.sh", ["n1", "--", "true"]),
])
def test_zone_is_required(fake, script, args):
    _error(fake.run(script, *args), "the zone is required")


@pytest.mark.parametrize("script,args,command", [
    ("create_vm.sh", ["n1", "--zone=z"], []),
    ("setup.sh", ["n1", "--zone=z", "--git_url=u"], []),
    ("launch.sh", ["n1", "--zone=z"], ["--", "true"]),
])
def test_unknown_option_and_missing_gcloud(fake, script, args, command):
    _error(fake.run(script, *args, "--bogus", *command), "unknown option --bogus")
    env = fake.env(PATH="/usr/bin:/bin")  # no gcloud
    if shutil.which("gcloud", path=env["PATH"]) is None:
        _error(fake.run(script, *args, *command, env=env), "gcloud not found on PATH")
        _ok(fake.run(script, *args, "--dry_run", *command, env=env))  # a dry run needs no gcloud


# --------------------------------------------------------------------------------------- create_vm.sh


def test_create_vm_dry_run_prints_and_runs_nothing(fake):
    proc = _ok(fake.run("create_vm.sh", "cm3leon-7b", "--zone=us-west4-a", "--spot", "--dry_run"))
    assert ("+ gcloud compute tpus tpu-vm create cm3leon-7b --zone=us-west4-a --accelerator-type=v5litepod-256 "
            "--version=v2-alpha-tpuv5-lite --spot") in proc.stdout
    assert fake.calls() == []


@pytest.mark.parametrize("accel,runtime", [
    ("v5litepod-256", "v2-alpha-tpuv5-lite"), ("v4-128", "tpu-ubuntu2204-base"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_create_vm_arguments(fake, accel, runtime):
    proc = _ok(fake.run("create_vm.sh", "--name=my-tpu", "--zone", "us-central2-b", f"--accelerator_type={accel}",
                        "--project=proj-1", "--preemptible"))
    want = ["compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b", "--project=proj-1",
            f"--accelerator-type={accel}", f"--version={runtime}", "--preemptible"]
    assert fake.calls() == [want]
    assert "+ gcloud " + " ".join(want) in proc.stdout  # printed before it ran


def test_create_vm_from_environment_and_passthrough(fake):
    env = fake.env(TPU_NAME="env-tpu", TPU_ZONE="europe-west4-b", TPU_ACCELERATOR_TYPE="v5p-128",
                   TPU_RUNTIME_VERSION="v2-custom", TPU_PROJECT="p2", TPU_SPOT="1")
    _ok(fake.run("create_vm.sh", "--gcloud_arg=--network=my-net", "--gcloud_arg", "--internal-ips", env=env))
    assert fake.calls() == [["compute", "tpus", "tpu-vm", "create", "env-tpu", "--zone=europe-west4-b",
                             "--project=p2", "--accelerator-type=v5p-128", "--version=v2-custom", "--spot",
                             "--network=my-net", "--internal-ips"]]
    # a flag wins over its variable
    _ok(fake.run("create_vm.sh", "--zone=us-east5-a", "other-tpu", env=env))
    assert fake.calls()[-1][4:6] == ["other-tpu", "--zone=us-east5-a"]


def test_create_vm_queued(fake):
    proc = _ok(fake.run("create_vm.sh", "cm3leon-7b", "--zone=us-west4-a", "--queued", "--spot",
                        "--valid_until_duration=6h"))
    assert fake.calls() == [["compute", "tpus", "queued-resources", "create", "cm3leon-7b-qr",
                             "--node-id=cm3leon-7b", "--zone=us-west4-a", "--accelerator-type=v5litepod-256",
                             "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--valid-until-duration=6h"]]
    assert "queued-resources describe cm3leon-7b-qr --zone=us-west4-a" in proc.stdout
    _ok(fake.run("create_vm.sh", "n2", "--zone=z", "--queued", "--queued_id=my-qr", "--accelerator_type=v4-128"))
    assert fake.calls()[-1][4:6] == ["my-qr", "--node-id=n2"]


@pytest.mark.parametrize("args,message", [
    (["--spot", "--preemptible"], "--spot and --preemptible exclude each other"),
    (["--queued", "--preemptible"], "queued resources take --spot, not --preemptible"),
    (["--valid_until_duration=2h"], "--valid_until_duration applies to --queued only"),
    (["--accelerator_type=v3-8"], "no default runtime version for accelerator type 'v3-8'"),
    (["--accelerator_type=tpu256"], "invalid accelerator type 'tpu256'"),
    (["--zone"], "--zone needs a value"),
    (["second-name"], "more than one NAME given"),
])
def test_create_vm_errors(fake, args, message):
    _error(fake.run("create_vm.sh", "n1", "--zone=z", *args), message)
    assert fake.calls() == []


def test_create_vm_bad_name(fake):
    _error(fake.run("create_vm.sh", "My_TPU", "--zone=z"), "invalid TPU VM name 'My_TPU'")


# --------------------------------------------------------------------------------------- setup.sh


def test_setup_from_git(fake):
    proc = _ok(fake.run("setup.sh", "cm3leon-7b", "--zone=us-west4-a", "--project=p",
                        "--git_url=https://example.com/org/cm3leon_jax.git", "--branch=dev"))
    calls = fake.calls()
    assert len(calls) == 1
    call = calls[0]
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "cm3leon-7b", "--worker=all", "--zone=us-west4-a"]
    assert call[7] == "--project=p" and call[8].startswith("--command=")
    script = _command_of(call)
    _bash_n(script)
    assert "git clone --quiet --branch dev https://example.com/org/cm3leon_jax.git" in script
    assert "uv venv --python 3.11" in script
    assert 'uv pip install --python "$VENV/bin/python" -e .\\[tpu\\]' in script
    assert "import jax, cm3leon_jax" in script
    assert "+ gcloud compute tpus tpu-vm ssh cm3leon-7b --worker=all" in proc.stdout


def test_setup_dry_run(fake):
    proc = _ok(fake.run("setup.sh", "n1", "--zone=z", "--git_url=u", "--dry_run", "--extras=tpu,test",
                        "--no_check", "--worker=0"))
    assert fake.calls() == []
    assert "+ gcloud compute tpus tpu-vm ssh n1 --worker=0 --zone=z" in proc.stdout
    assert "import jax" not in proc.stdout
    _ok(fake.run("setup.sh", "n1", "--zone=z", "--git_url=u", "--extras=tpu,test", "--no_check"))
    script = _command_of(fake.calls()[0])
    words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + script.split(" -e ", 1)[1].splitlines()[0]],
                           capture_output=True, text=True).stdout.split()
    assert words == [".[tpu,test]"]  # pip install -e '.[tpu,test]'


def test_setup_local_copies_this_checkout(fake):
    if subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    _ok(fake.run("setup.sh", "n1", "--zone=z", "--local", "--remote_dir=~/code", "--venv=/opt/venv"))
    scp, ssh = fake.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["n1:cm3leon_jax_src.tar.gz", "--worker=all", "--zone=z"]
    assert not os.path.exists(scp[4]), "the temporary tarball is removed"
    with tarfile.open(fake.fake_home / "cm3leon_jax_src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.py", "tpu/setup.sh", "cm3leon_jax/paths.py"} <= names
    assert not any(n.startswith(".venv/") for n in names)
    script = _command_of(ssh)
    _bash_n(script)
    assert "SRC=code;" in script and "VENV=/opt/venv;" in script
    assert 'tar -xzf "$HOME"/cm3leon_jax_src.tar.gz -C "$SRC"' in script


def test_setup_tarball(fake, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(os.path.join(REPO, "setup.py"), arcname="setup.py")
    _ok(fake.run("setup.sh", "n1", "--zone=z", f"--tarball={tarball}"))
    assert fake.calls()[0][4] == str(tarball)
    _error(fake.run("setup.sh", "n1", "--zone=z", "--tarball=/nonexistent.tar.gz"), "is not a file")


@pytest.mark.parametrize("args,message", [
    ([], "say where the code comes from: --git_url=URL, --tarball=FILE or --local"),
    (["--git_url=u", "--local"], "give only one of --git_url, --tarball and --local"),
    (["--git_url=u", "--python=three"], "invalid --python 'three'"),
    (["--git_url=u", "--extras=tpu;rm"], "invalid --extras"),
])
def test_setup_errors(fake, args, message):
    _error(fake.run("setup.sh", "n1", "--zone=z", *args), message)
    assert fake.calls() == []


# --------------------------------------------------------------------------------------- launch.sh


def _fake_workers_home(fake):
    home = fake.fake_home
    (home / "cm3leon_jax").mkdir(exist_ok=True)
    (home / "cm3leon_venv" / "bin").mkdir(parents=True, exist_ok=True)
    py = home / "cm3leon_venv" / "bin" / "python"
    if not py.exists():
        py.symlink_to(sys.executable)
    return home


def test_launch_dry_run(fake):
    proc = _ok(fake.run("launch.sh", "cm3leon-7b", "--zone=us-west4-a", "--dry_run", "--run_name=r1", "--",
                        "cm3leon", "train", "--gin_file=gin/cm3leon_7b.gin", "--model_dir=gs://B/run"))
    assert fake.calls() == []
    assert "+ gcloud compute tpus tpu-vm ssh cm3leon-7b --worker=all --zone=us-west4-a" in proc.stdout
    assert "cm3leon train --gin_file=gin/cm3leon_7b.gin --model_dir=gs://B/run" in proc.stdout
    assert not (fake.path / "tpu_logs").exists()


def test_launch_runs_on_every_worker_with_logs(fake):
    home = _fake_workers_home(fake)
    env = fake.env(FAKE_GCLOUD_EXEC="1", FAKE_WORKERS="2")
    prog = "import os, sys; print('hello', os.environ['CM3LEON_X'], os.getcwd().endswith('cm3leon_jax'), sys.executable)"
    proc = _ok(fake.run("launch.sh", "n1", "--zone=z", "--project=p", "--env=CM3LEON_X=a b", "--run_name=r1",
                        "--log_dir=logs", "--", "python", "-c", prog, env=env))
    (call,) = fake.calls()
    assert call[:8] == ["compute", "tpus", "tpu-vm", "ssh", "n1", "--worker=all", "--zone=z", "--project=p"]
    _bash_n(_command_of(call))
    for w in (0, 1):
        assert f"[worker {w}] hello a b True" in proc.stdout
        local = (fake.path / "logs" / "r1" / f"worker-{w}.log").read_text()
        assert "hello a b True" in local and "exit status 0" in local
        remote = (home / "cm3leon_logs" / f"r1.worker{w}.log").read_text()
        assert "hello a b True" in remote
        assert "cm3leon_venv" in remote  # the virtualenv's python ran it
    assert (fake.path / "logs" / "r1" / "all.log").exists()


def test_launch_shell_line_and_exit_status(fake):
    _fake_workers_home(fake)
    env = fake.env(FAKE_GCLOUD_EXEC="1", FAKE_WORKERS="2")
    proc = fake.run("launch.sh", "n1", "--zone=z", "--run_name=r2", "--", 'echo "w=$FAKE_WORKER" && exit 3', env=env)
    assert proc.returncode == 3, proc.stderr
    assert "[worker 1] w=1" in proc.stdout
    assert "failed on at least one worker" in proc.stderr
    # one worker only
    _ok(fake.run("launch.sh", "n1", "--zone=z", "--worker=1", "--run_name=r3", "--", "true", env=env))
    assert fake.calls()[-1][5] == "--worker=1"
    assert (fake.path / "tpu_logs" / "n1" / "r3" / "worker-1.log").exists()
    assert not (fake.path / "tpu_logs" / "n1" / "r3" / "worker-0.log").exists()


def test_launch_detach(fake):
    home = _fake_workers_home(fake)
    env = fake.env(FAKE_GCLOUD_EXEC="1", FAKE_WORKERS="1")
    proc = _ok(fake.run("launch.sh", "n1", "--zone=z", "--detach", "--run_name=r4", "--",
                        'sleep 0.2; echo done-$FAKE_WORKER', env=env))
    assert "started (pid" in proc.stdout
    log = home / "cm3leon_logs" / "r4.worker0.log"
    for _ in range(100):
        if log.exists() and "done-0" in log.read_text():
            break
        time.sleep(0.1)
    assert "done-0" in log.read_text()


def test_launch_without_virtualenv_says_so(fake):
    env = fake.env(FAKE_GCLOUD_EXEC="1", FAKE_WORKERS="1")
    (fake.fake_home / "cm3leon_jax").mkdir()
    proc = fake.run("launch.sh", "n1", "--zone=z", "--run_name=r5", "--", "true", env=env)
    assert proc.returncode == 1
    assert "no virtualenv at" in proc.stdout and "run tpu/setup.sh first" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["n1", "--zone=z"], "no command given: put it after --"),
    (["n1", "--zone=z", "--env=1BAD=x", "--", "true"], "--env wants KEY=VALUE, got '1BAD=x'"),
    (["n1", "--zone=z", "--run_name=a/b", "--", "true"], "invalid --run_name 'a/b'"),
    (["n1", "extra", "--zone=z", "--", "true"], "unexpected argument 'extra'"),
])
def test_launch_errors(fake, args, message):
    _error(fake.run("launch.sh", *args), message)
    assert fake.calls() == []
