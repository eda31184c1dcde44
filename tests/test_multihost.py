"""Multi-process runs as real processes on localhost: 2 processes x 4 CPU devices against 1 x 8.

Each process is the real CLI (`normistral train|generate ... --coordinator localhost:PORT --num-processes 2
--process-id I`); collectives between processes go through gloo.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.multihost import REPO
from tests.multihost import cpu_env as _env
from tests.multihost import free_port as _port
from tests.multihost import losses as _losses
from tests.multihost import train_cmd as _train_cmd
from tests.multihost import train_one as _one
from tests.multihost import train_two as _two

RUN = ["train.steps=9", "checkpoint.every=3", "checkpoint.keep=5", "train.eval_every=0"]


def _params(workdir, step):
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "params")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)  # the tree of array metadata
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    return ckptr.restore(path, target)


def _assert_close(a: dict, b: dict, steps):
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-6), (s, a[s], b[s])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 9-step reference run on 1 process x 8 devices and the same run on 2 processes x 4 devices."""
    root = tmp_path_factory.mktemp("multihost")
    data_run = str(root / "data")  # prepare the bundled corpus once; both runs read the same data
    _one(data_run, ["train.steps=1", "checkpoint.every=1"], [])
    data = [f"data.dir={data_run}/data", f"data.tokenizer_dir={data_run}/tokenizer"]
    one, two = str(root / "one"), str(root / "two")
    _one(one, RUN, data)
    _two(two, RUN, data)
    return {"one": one, "two": two, "data": data, "root": root}


def test_two_processes_train_the_same_run_as_one(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, 10))  # process 0 wrote one line per step
    _assert_close(two, one, range(1, 10))
    import jax

    a, b = jax.tree.leaves(_params(runs["one"], 9)), jax.tree.leaves(_params(runs["two"], 9))
    assert len(a) == len(b)
    # Per tensor, relative in norm: the cross-process all-reduce sums in another order than the in-process
    # one, and Adam's m / sqrt(v) magnifies last-bit gradient differences in entries whose gradient is ~0.
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(y - x) <= 1e-6 * np.linalg.norm(x)


def test_checkpoints_move_between_one_and_two_processes(runs, tmp_path):
    # Saved by 2 processes, resumed by 1 (from step 6) ...
    work = str(tmp_path / "two-to-one")
    shutil.copytree(runs["two"], work)
    shutil.rmtree(os.path.join(work, "checkpoints", "9"))
    _one(work, RUN, runs["data"])
    _assert_close(_losses(work), _losses(runs["one"]), range(7, 10))
    # ... and saved by 1, resumed by 2.
    work = str(tmp_path / "one-to-two")
    shutil.copytree(runs["one"], work)
    shutil.rmtree(os.path.join(work, "checkpoints", "9"))
    _two(work, RUN, runs["data"])
    _assert_close(_losses(work), _losses(runs["one"]), range(7, 10))


def test_a_dead_process_stops_the_other_and_a_restart_resumes(runs, tmp_path):
    work = str(tmp_path / "killed")
    heartbeat = 10
    # Process 1 kills itself (SIGKILL) at step 5, after the step-3 checkpoint is complete.
    procs = _two(work, RUN, runs["data"], faults=(None, "kill_at_step=5"), heartbeat=heartbeat, wait=False)
    procs[1].wait(timeout=300)
    died = time.time()
    assert procs[1].returncode == -signal.SIGKILL
    try:
        procs[0].wait(timeout=heartbeat + 50)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(f"process 0 still running {heartbeat + 50} s after process 1 died")
    assert procs[0].returncode != 0
    assert time.time() - died <= heartbeat + 50
    for p in procs:
        p.communicate()
    # Restarting both resumes from the last complete checkpoint and matches the uninterrupted run.
    done = sorted(int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit())
    assert done and done[-1] in (3, 6)
    _two(work, RUN, runs["data"])
    _assert_close(_losses(work), _losses(runs["one"]), range(done[-1] + 1, 10))


def test_generation_across_two_processes_equals_one(runs):
    """The reference run's weights, exported by the trainer, generate the same tokens on 1 process x 8
    devices and on 2 processes x 4 devices (the model sharded over both)."""
    model_dir = os.path.join(runs["root"], "hf")
    tokenizer = runs["data"][1].split("=", 1)[1]
    # Export the reference run's final parameters through a 1-process training rerun (train.export_hf).
    _one(str(runs["root"] / "export-run"), RUN + [f"train.export_hf={model_dir}"], runs["data"])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer, name), model_dir)
    prompts = ["Været er fint i dag", "Engelsk: I am hungry.\nBokmål:", "Oslo", "Hei"]
    base = [sys.executable, "-m", "normistral", "generate", model_dir, "--max-new-tokens", "12",
            "--dtype", "float32", "--prompt", *prompts]
    single = subprocess.run(base + ["--mesh", "1,-1,1"], env=_env(8), capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert single.returncode == 0, single.stderr[-2000:]
    port = _port()
    procs = [subprocess.Popen(base + ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                      "--process-id", str(pid)], env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]

    def results(stdout):
        return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]

    expected = results(single.stdout)
    assert len(expected) == len(prompts) and all(r["output"] for r in expected)
    assert results(outs[0][0]) == expected
    assert results(outs[1][0]) == []  # only process 0 reports


# -- JAX's own cluster detection (no flags): two processes under Slurm's environment variables ------------------

PROBE = """
import json, os, sys, time
import jax
from jax._src import distributed
from jax.experimental import multihost_utils
from jaxmodel.distributed import DistributedArgs, detected_cluster, initialize
found = detected_cluster()
joined = initialize(DistributedArgs(heartbeat_timeout=int(sys.argv[1])))
gathered = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index() + 10))
print(json.dumps({"found": found, "joined": joined, "count": jax.process_count(), "index": jax.process_index(),
                  "devices": jax.device_count(), "gathered": gathered.tolist(),
                  "heartbeats": distributed.global_state.client is not None,
                  "preemption_service": distributed.global_state.preemption_sync_manager is not None,
                  "sync_point": bool(multihost_utils.reached_preemption_sync_point(0))}), flush=True)
if sys.argv[2] == "die" and jax.process_index() == 1:
    os._exit(0)  # no shutdown: its heartbeats simply stop
if sys.argv[2] == "die":
    time.sleep(120)  # JAX must end this process when the other one's heartbeats stop
"""


def _slurm_env(pid: int, port: int, **extra) -> dict:
    """What `srun --ntasks=2` on one node sets (the variables JAX's SlurmCluster reads), plus the port."""
    return _env(4, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid), JAX_COORDINATOR_PORT=str(port), **extra)


def _report(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])  # (gloo chatters too)


def _slurm(cmd, *, faults=(None, None)):
    port = _port()
    procs = [subprocess.Popen(cmd, env=_slurm_env(pid, port, **({"NORMISTRAL_FAULTS": faults[pid]} if faults[pid]
                                                                 else {})),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for pid in (0, 1)]
    return procs, [p.communicate(timeout=300) for p in procs]


def test_slurm_environment_is_detected_and_both_processes_join():
    procs, outs = _slurm([sys.executable, "-c", PROBE, "30", "stay"])
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    reports = [_report(out) for out, _ in outs]
    for pid, r in enumerate(reports):
        assert r["found"] == ["slurm", 2] and r["joined"] and r["count"] == 2 and r["index"] == pid
        assert r["devices"] == 8 and r["gathered"] == [10, 11]  # a collective across the two processes
        assert r["heartbeats"] and r["preemption_service"] and r["sync_point"] is False


def test_a_dead_slurm_process_stops_the_other_by_heartbeat():
    started = time.time()
    procs, outs = _slurm([sys.executable, "-c", PROBE, "5", "die"])
    assert procs[1].returncode == 0 and _report(outs[1][0])["joined"]
    assert procs[0].returncode != 0  # ended by JAX's distributed service, not by its own sleep(120)
    assert time.time() - started < 90


def test_two_slurm_processes_train_the_same_run_as_one(runs, tmp_path):
    work = str(tmp_path / "slurm")
    procs, outs = _slurm(_train_cmd(work, RUN + runs["data"]))  # no --coordinator/--num-processes/--process-id
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
    assert "fsdp': 8" in outs[0][1]  # one mesh over both processes' devices
    one, two = _losses(runs["one"]), _losses(work)
    assert sorted(two) == list(range(1, 10))
    _assert_close(two, one, range(1, 10))


def test_sigterm_under_slurm_stops_both_processes_at_one_sync_point(runs, tmp_path):
    work = str(tmp_path / "slurm-preempted")
    # Process 1 alone gets the preemption notice (SIGTERM) after step 3; JAX's preemption sync point
    # makes both save the same step and exit 0.
    procs, outs = _slurm(_train_cmd(work, RUN + runs["data"]), faults=(None, "sigterm_at_step=3"))
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    stopped = [int(out.split("preempted at step ")[1].split()[0]) for out, _ in outs]
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < 9
    assert str(stopped[0]) in os.listdir(os.path.join(work, "checkpoints"))
    assert max(_losses(work)) == stopped[0]
