"""Multi-host without hosts: 2 JAX processes on this machine (CPU backend,
gloo collectives, jax.distributed on localhost), each feeding its half of
the global batch through `partitioning.global_batch_from_local`, run the
trainer's own sharded init and jitted train step (`trainer.build_train_step`)
over a mesh spanning both processes; their losses, grad norms and updated
params must match a 1-process run over the same global batch. Then the real
`cm3leon train` CLI with 2 processes: only process 0 writes metrics and
config.gin, the Orbax checkpoint written by both resumes on both."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cm3leon_jax import distributed
from conftest import REPO, SMALL, read_metrics

STEPS = 4
DISTRIBUTED_ENV = (distributed.ENV_MODE, distributed.ENV_COORDINATOR, distributed.JAX_ENV_COORDINATOR,
                   distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID, distributed.ENV_CPU_COLLECTIVES,
                   distributed.ENV_TIMEOUT)
BATCH = 8
LENGTH = 32

# One process of a run. argv[1]: JSON {"meshes": {name: [[data, fsdp, model],
# devices]}, "out": dir, ...}; devices "all" or "one_per_process". Each mesh
# trains from the same init on the same batches. Multi-process settings come
# from the CM3LEON_* environment, as on a cluster.
WORKER = r"""
import json, os, sys
from cm3leon_jax import distributed
multi = distributed.initialize_distributed()  # first: before anything touches devices
assert distributed.initialize_distributed() == multi  # idempotent
import jax
import numpy as np
from jax.experimental import multihost_utils
from cm3leon_jax import gin_utils, partitioning
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.train import trainer

cfg = json.loads(sys.argv[1])
STEPS, BATCH, LENGTH = cfg["steps"], cfg["batch"], cfg["length"]
gin_utils.parse(["gin/cm3leon_tiny.gin"], [
    "DecoderConfig.num_layers = 2", "DecoderConfig.d_model = 64", "DecoderConfig.num_heads = 4",
    "DecoderConfig.d_ff = 256", "PEAK_LEARNING_RATE = 3e-3", "WARMUP_STEPS = 1",
    "MODEL_DIR = '/unused'"])
config = DecoderConfig()
rules = partitioning.logical_axis_rules()
pid = jax.process_index()


def global_batch(step):
    # Deterministic decoder_* features: two packed segments per row, padding.
    # Targets are arithmetic progressions (learnable: the loss falls).
    rng = np.random.default_rng(1000 + step)
    start = rng.integers(4, config.vocab_size, size=(BATCH, 1))
    stride = rng.integers(1, 4, size=(BATCH, 1))
    tgt = ((start + stride * np.arange(LENGTH)) % (config.vocab_size - 4) + 4).astype(np.int32)
    seg = np.zeros((BATCH, LENGTH), np.int32)
    pos = np.zeros((BATCH, LENGTH), np.int32)
    inp = np.zeros((BATCH, LENGTH), np.int32)
    for r in range(BATCH):
        split = int(rng.integers(LENGTH // 4, 3 * LENGTH // 4))
        end = LENGTH - int(rng.integers(0, 6))
        for s, (a, b) in enumerate(((0, split), (split, end)), start=1):
            seg[r, a:b] = s
            pos[r, a:b] = np.arange(b - a)
            inp[r, a + 1:b] = tgt[r, a:b - 1]
        tgt[r, end:] = 0
    return {"decoder_target_tokens": tgt, "decoder_input_tokens": inp,
            "decoder_loss_weights": (seg > 0).astype(np.float32),
            "decoder_segment_ids": seg, "decoder_positions": pos}


def run(name, shape, devices):
    if devices == "one_per_process":
        devices = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
    else:
        devices = jax.devices()
    mesh = partitioning.create_mesh(*shape, devices=devices)
    built = trainer.build_train_step(config, STEPS, LENGTH, mesh, rules)
    state = built.sharded_init()
    if cfg.get("save_init"):
        init = multihost_utils.process_allgather(state.params, tiled=True)
        np.savez(os.path.join(cfg["out"], f"{name}.init{pid}.npz"),
                 **{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(init)})
    # This process's rows of the global batch: those its devices hold.
    index_map = built.batch_sharding.addressable_devices_indices_map((BATCH, LENGTH))
    rows = sorted({i for idx in index_map.values() for i in range(*idx[0].indices(BATCH))})
    lo, hi = rows[0], rows[-1] + 1
    assert rows == list(range(lo, hi)), rows  # a contiguous block
    losses, grad_norms = [], []
    with mesh:
        for step in range(STEPS):
            local = {k: v[lo:hi] for k, v in global_batch(step).items()}
            batch = partitioning.global_batch_from_local(local, mesh, rules)
            state, metrics = built.jit_step(state, batch)
            m = jax.device_get(metrics)
            losses.append(float(m["loss"]))
            grad_norms.append(float(m["grad_norm"]))
    emb = state.params["token_embedding"]
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(cfg["out"], f"{name}.params{pid}.npz"), **flat)
    return {"mesh": dict(mesh.shape), "mesh_devices": len(devices), "rows": [lo, hi], "losses": losses,
            "grad_norms": grad_norms,
            "embedding": {"shape": list(emb.shape), "local_shard": list(emb.addressable_shards[0].data.shape),
                          "fully_addressable": bool(emb.is_fully_addressable)}}


info = {"multi": multi, "process_index": pid, "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "runs": {name: run(name, shape, devices) for name, (shape, devices) in cfg["meshes"].items()}}
with open(os.path.join(cfg["out"], f"p{pid}.json"), "w") as f:
    json.dump(info, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env(process_id, num_processes, port, devices_per_process):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    for k in DISTRIBUTED_ENV:
        env.pop(k, None)
    if devices_per_process > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    if num_processes > 1:
        env.update(CM3LEON_COORDINATOR_ADDRESS=f"localhost:{port}", CM3LEON_NUM_PROCESSES=str(num_processes),
                   CM3LEON_PROCESS_ID=str(process_id), CM3LEON_CPU_COLLECTIVES="gloo",
                   CM3LEON_DISTRIBUTED_TIMEOUT="60")
    return env


def _run_processes(argv, num_processes, log_dir, devices_per_process=1, timeout=240):
    """Starts `num_processes` copies of argv (one distributed run), waits for
    all with one deadline; fails with every child's exit status and stderr."""
    os.makedirs(log_dir, exist_ok=True)
    port = _free_port()
    procs = []
    for i in range(num_processes):
        out = open(os.path.join(log_dir, f"stdout{i}.txt"), "w")
        err = open(os.path.join(log_dir, f"stderr{i}.txt"), "w")
        procs.append((subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, text=True,
                                       env=_child_env(i, num_processes, port, devices_per_process)), out, err))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p, _, _ in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for _, out, err in procs:
        out.close()
        err.close()
    outputs = []
    for i, (p, _, _) in enumerate(procs):
        with open(os.path.join(log_dir, f"stdout{i}.txt")) as f:
            stdout = f.read()
        with open(os.path.join(log_dir, f"stderr{i}.txt")) as f:
            stderr = f.read()
        outputs.append((p.returncode, stdout, stderr))
    if timed_out or any(rc != 0 for rc, _, _ in outputs):
        report = "\n".join(f"--- process {i}: exit {rc}\nstdout:\n{so[-2000:]}\nstderr:\n{se[-4000:]}"
                           for i, (rc, so, se) in enumerate(outputs))
        raise AssertionError(f"{num_processes}-process run {'timed out after %ds' % timeout if timed_out else 'failed'}"
                             f": {' '.join(argv[:4])} ...\n{report}")
    return outputs


def _worker_argv(out, meshes, save_init=False):
    os.makedirs(out, exist_ok=True)
    cfg = {"meshes": meshes, "out": str(out), "steps": STEPS, "batch": BATCH, "length": LENGTH,
           "save_init": save_init}
    return [sys.executable, "-c", WORKER, json.dumps(cfg)]


MESHES = {  # name: (mesh (data, fsdp, model), devices); both span the 2 processes
    "fsdp2_1dev_per_process": ([1, 2, 1], "one_per_process"),
    "fsdp2_model2_2dev_per_process": ([1, 2, 2], "all"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process reference (1 device, the whole global batch) and one
    2-process run (2 CPU devices each) training every mesh of MESHES, at the
    same time (they are independent)."""
    root = tmp_path_factory.mktemp("multihost")
    results = {}

    def one():
        _run_processes(_worker_argv(root / "one", {"ref": ([1, 1, 1], "all")}, save_init=True), 1, str(root / "one" / "logs"))

    def two():
        _run_processes(_worker_argv(root / "two", MESHES), 2, str(root / "two" / "logs"), devices_per_process=2)

    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {pool.submit(fn): name for name, fn in (("one", one), ("two", two))}
        for f in concurrent.futures.as_completed(futures):
            f.result()
    for name, n in (("one", 1), ("two", 2)):
        results[name] = [json.loads((root / name / f"p{i}.json").read_text()) for i in range(n)]
    return root, results


def _params(root, run, name, pid, what="params"):
    return dict(np.load(root / run / f"{name}.{what}{pid}.npz"))


def _max_param_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.slow
def test_reference_is_one_process(runs):
    _, results = runs
    ref = results["one"][0]
    assert not ref["multi"] and ref["process_count"] == 1 and ref["device_count"] == 1
    assert ref["runs"]["ref"]["rows"] == [0, BATCH]
    losses = ref["runs"]["ref"]["losses"]
    assert len(set(losses[1:])) == STEPS - 1, losses  # the updates change the loss (step 1 is at LR 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_two_processes_match_one(runs, name):
    root, results = runs
    ref = results["one"][0]["runs"]["ref"]
    ref_params = _params(root, "one", "ref", 0)
    shape = MESHES[name][0]
    infos = results["two"]
    for i, info in enumerate(infos):
        assert info["multi"] and info["process_index"] == i and info["process_count"] == 2
        assert info["device_count"] == 4 and info["local_device_count"] == 2
        r = info["runs"][name]
        assert r["mesh"] == dict(zip(("data", "fsdp", "model"), shape))
        # each process fed its own half of the global batch rows
        assert r["rows"] == [i * BATCH // 2, (i + 1) * BATCH // 2]
        # params really split across the processes (embed over fsdp, vocab over model)
        emb = r["embedding"]
        assert not emb["fully_addressable"]
        assert emb["local_shard"] == [emb["shape"][0] // shape[2], emb["shape"][1] // shape[1]]
    a, b = infos[0]["runs"][name], infos[1]["runs"][name]
    params = [_params(root, "two", name, i) for i in range(2)]
    # the processes agree with each other exactly and with 1 process closely
    assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
    assert _max_param_diff(params[0], params[1]) == 0.0
    loss_diff = np.max(np.abs(np.subtract(a["losses"], ref["losses"])))
    gn_rel = np.max(np.abs(np.subtract(a["grad_norms"], ref["grad_norms"])) / np.abs(ref["grad_norms"]))
    param_diff = _max_param_diff(params[0], ref_params)
    # AdamW's first updates are nearly sign(g) * lr, so a gradient entry near 0
    # can move by a few % of lr on reduction-order noise: compare the updates
    # as a whole (relative L2 over all params) and bound the worst entry.
    init = _params(root, "one", "ref", 0, "init")
    update_norm = np.sqrt(sum(np.sum(np.square(ref_params[k] - init[k])) for k in init))
    diff_norm = np.sqrt(sum(np.sum(np.square(params[0][k] - ref_params[k])) for k in init))
    print(f"\n{name}: max |loss diff| {loss_diff:.3g}, max rel grad-norm diff {gn_rel:.3g}, "
          f"after {STEPS} steps max |param diff| {param_diff:.3g}, |param diff| / |update| "
          f"{diff_norm / update_norm:.3g}; losses {a['losses']} vs {ref['losses']}")
    np.testing.assert_allclose(a["losses"], ref["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(a["grad_norms"], ref["grad_norms"], rtol=1e-5)
    assert diff_norm / update_norm < 1e-4
    assert param_diff < 1e-4, param_diff  # peak LR 3e-3


def test_single_process_no_op_and_bad_settings_are_named():
    env = _child_env(0, 1, 0, 1)
    probe = ("try:\n    print('OK', distributed.initialize_distributed())\n"
             "except distributed.DistributedConfigError as e:\n    print('ERR', e)\n")
    cases = [({}, "OK False"),  # an ordinary run: nothing happens
             ({"CM3LEON_NUM_PROCESSES": "1"}, "OK False"),
             ({"CM3LEON_DISTRIBUTED": "off", "CM3LEON_NUM_PROCESSES": "2"}, "OK False"),
             ({"CM3LEON_NUM_PROCESSES": "two"}, "ERR CM3LEON_NUM_PROCESSES='two' is not an integer"),
             ({"CM3LEON_NUM_PROCESSES": "2", "CM3LEON_PROCESS_ID": "2",
               "CM3LEON_COORDINATOR_ADDRESS": "localhost:1"}, "ERR CM3LEON_PROCESS_ID=2 is out of range"),
             ({"CM3LEON_COORDINATOR_ADDRESS": "localhost"}, "needs a port: write HOST:PORT"),
             ({"CM3LEON_NUM_PROCESSES": "2"}, "but not coordinator_address (env CM3LEON_COORDINATOR_ADDRESS"),
             ({"CM3LEON_DISTRIBUTED": "maybe"}, "ERR CM3LEON_DISTRIBUTED='maybe': must be one of"),
             ({"CM3LEON_CPU_COLLECTIVES": "nccl", "CM3LEON_NUM_PROCESSES": "2"},
              "ERR CM3LEON_CPU_COLLECTIVES='nccl': must be one of"),
             ({}, "OK False"),  # idempotent
             # too late: JAX's backends are up (jax.devices() below)
             ({"CM3LEON_NUM_PROCESSES": "2", "CM3LEON_PROCESS_ID": "0",
               "CM3LEON_COORDINATOR_ADDRESS": "localhost:1"}, "JAX's backends are already initialised")]
    lines = ["import os", "from cm3leon_jax import distributed"]
    for i, (e, _) in enumerate(cases):
        if i == len(cases) - 1:
            lines.append("import jax; jax.devices()")
        lines += [f"os.environ.clear(); os.environ.update({dict(env, **e)!r})", probe]
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [line for line in proc.stdout.splitlines() if line.startswith(("OK", "ERR"))]
    assert len(out) == len(cases), proc.stdout
    for line, (_, expected) in zip(out, cases):
        assert expected in line, line


@pytest.mark.slow
def test_cli_train_two_processes_chief_writes_and_resumes(tmp_path):
    model_dir = tmp_path / "run"
    args = [sys.executable, "-m", "cm3leon_jax.cli", "train", *SMALL, "--gin.train.checkpoint_every=1000",
            f"--model_dir={model_dir}"]
    outs = _run_processes(args + ["--gin.TRAIN_STEPS=3"], 2, str(tmp_path / "logs1"))
    rows = read_metrics(model_dir)
    assert [r["step"] for r in rows] == [1, 2, 3], rows  # written once, by process 0
    assert (model_dir / "config.gin").exists()
    assert len(list(model_dir.glob("events.out.tfevents.*"))) == 1  # TensorBoard: the chief's only
    assert (model_dir / "checkpoints" / "3").is_dir()
    results = [json.loads(so.strip().splitlines()[-1]) for _, so, _ in outs]
    assert results[0]["loss"] == results[1]["loss"] and results[0]["step"] == 3
    assert "resumed" not in outs[0][2]
    # both processes restore the checkpoint they wrote together, and continue
    outs = _run_processes(args + ["--gin.TRAIN_STEPS=4"], 2, str(tmp_path / "logs2"))
    assert "resumed from step 3" in outs[0][2]
    assert "resumed" not in outs[1][2]  # progress and messages from the chief only
    rows = read_metrics(model_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], rows
    assert len(list(model_dir.glob("events.out.tfevents.*"))) == 2
    assert all(np.isfinite(r["loss"]) for r in rows)
