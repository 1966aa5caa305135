"""Calibration on a real Slurm cluster: two slurmd "hosts" in their own network namespaces.

The module starts the throw-away cluster of scripts/slurm/ (installing Debian's slurm-wlm and munge
with apt if they are missing) and stops it at the end. It needs root and network namespaces, and is
skipped, with the reason, where either is missing. The jobs are the sbatch template users submit,
scripts/slurm/calibrate.sbatch, over the tiny timm ViT and 10 images in 3 global batches of 4.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests_support import assert_same_calibration, recipe_file, run

from dymu_lightning.lit.calibration import STATE_FILE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "slurm"
TEMPLATE = SCRIPTS / "calibrate.sbatch"


def cluster_setting(name: str) -> list[str]:
    """A setting of scripts/slurm/env.sh (the names derive from DYMU_SLURM_DIR), as its words."""
    script = f'source "{SCRIPTS / "env.sh"}" && echo "${{{name}[@]}}"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


NODES = cluster_setting("NODES")  # slnode1, slnode2 for the default DYMU_SLURM_DIR
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (network namespaces, daemons); run as root to test Slurm"
    for tool in ("unshare", "nsenter", "setpriv"):  # util-linux; up.sh installs Slurm, munge and iproute2
        if shutil.which(tool) is None:
            return f"no namespace tools: `{tool}` (util-linux) not found"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no network namespaces on this machine (`unshare --net` failed: {probe.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The environment for sbatch/squeue/scontrol while the cluster runs (SLURM_CONF set)."""
    reason = _why_no_cluster()
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "SLURM_CONF": os.environ.get("DYMU_SLURM_DIR", "/tmp/dymu-slurm") + "/slurm.conf"}
    up = subprocess.run([SCRIPTS / "up.sh"], capture_output=True, text=True, timeout=600, env=env)
    # Status 2: up.sh refused before starting anything (a cluster of this DYMU_SLURM_DIR runs already,
    # someone else's): tearing down is not ours to do.
    assert up.returncode != 2, f"scripts/slurm/up.sh refused:\n{up.stderr}"
    try:
        assert up.returncode == 0, f"scripts/slurm/up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield env
    finally:
        down = subprocess.run([SCRIPTS / "down.sh"], capture_output=True, text=True, timeout=120, env=env)
        assert down.returncode == 0, down.stderr
        left = [node for node in NODES if (Path("/run/netns") / node).exists()]
        assert not left, f"down.sh left namespaces behind: {left}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards):
    """The reference: one process, same global batches."""
    return run(recipe_file(tmp_path_factory.mktemp("single"), shards))


def submit(
    env: dict[str, str],
    folder: Path,
    *options: str,
    overrides: tuple[str, ...] = (),
    template: Path = TEMPLATE,
    arguments: tuple[str, ...] = (),
    **extra_env: str,
) -> str:
    """sbatch a template with the tiny recipe in ``folder``; returns the job id."""
    recipe = folder / "tiny.yaml"  # written by recipe_file
    job_env = {**env, "DYMU_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    job_env.update(extra_env)
    command = ["sbatch", "--parsable", f"--chdir={folder}", f"--output={folder}/job-%j.out", *options, str(template)]
    command += [*arguments, f"recipe={recipe}", *overrides]
    submitted = subprocess.run(command, capture_output=True, text=True, timeout=60, env=job_env, check=True)
    return submitted.stdout.strip().split(";")[0]


def job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (no accounting daemon here, so no sacct)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def wait(env: dict[str, str], job_id: str, until: set[str] = DONE, timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(env, job_id)
        if info.get("JobState") in until:
            return info
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(f"job {job_id} did not reach {sorted(until)} in {timeout} s: {job(env, job_id)}")


def log(folder: Path, job_id: str) -> str:
    return (folder / f"job-{job_id}.out").read_text()


def steps_saved(out_dir: Path) -> int:
    path = out_dir / STATE_FILE
    return int(torch.load(path, weights_only=True)["steps_done"]) if path.is_file() else 0


def wait_for_saved_step(env: dict[str, str], job_id: str, out_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while steps_saved(out_dir) < step:
        assert time.monotonic() < deadline, f"no state at step {step} after {timeout} s: {job(env, job_id)}"
        assert job(env, job_id).get("JobState") not in DONE, f"job {job_id} ended early: {job(env, job_id)}"
        time.sleep(0.2)


def release(env: dict[str, str], job_id: str) -> None:
    """A requeued job waits ~2 min (Slurm holds it with Reason=BeginTime); start it in 2 s instead.

    Not at once: slurmd revokes the first run's credential with a one-second resolution, and a relaunch
    in the same second is killed at start ("Job credential revoked"), which the hold exists to prevent.
    """
    wait(env, job_id, until={"PENDING"}, timeout=60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], env=env, check=True)


@pytest.mark.parametrize(("nodes", "tasks"), [(2, 1), (1, 2)], ids=["2nodes-x-1task", "1node-x-2tasks"])
def test_sbatch_calibration_equals_one_process(cluster, tmp_path, shards, single, nodes, tasks):
    folder = tmp_path / "job"
    recipe_file(folder, shards)
    job_id = submit(cluster, folder, f"--nodes={nodes}", f"--ntasks-per-node={tasks}")
    info = wait(cluster, job_id)
    output = log(folder, job_id)
    assert info["JobState"] == "COMPLETED", output
    nodelist = f"{NODES[0][:-1]}[1-2]" if nodes == 2 else NODES[0]
    assert f"on {nodelist}: {nodes} node(s) x {tasks} task(s)" in output
    assert_same_calibration(folder / "out", single, world_size=2)


@pytest.mark.parametrize("preempt", ["SIGUSR1", "scontrol requeue"])
def test_preempted_job_resumes_to_the_uninterrupted_result(cluster, tmp_path, shards, single, preempt):
    """The job stalls after saving step 2 of 3; SIGUSR1 (what `--signal=USR1@120` sends before the time
    limit) or `scontrol requeue` (what preemption does) sends it back to the queue; the rerun resumes."""
    folder = tmp_path / "job"
    recipe_file(folder, shards)
    job_id = submit(cluster, folder, "--nodes=2", "--ntasks-per-node=1", DYMU_FAULT_STALL_AFTER_STEP="2")
    wait_for_saved_step(cluster, job_id, folder / "out", 2)
    if preempt == "SIGUSR1":
        subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster, check=True)  # the tasks, not the shell
    else:
        subprocess.run(["scontrol", "requeue", job_id], env=cluster, check=True)
    release(cluster, job_id)
    info = wait(cluster, job_id)
    output = log(folder, job_id)  # --open-mode=append: both runs
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output
    assert "restart 0" in output and "restart 1" in output
    if preempt == "SIGUSR1":
        assert f"stopped at global step 2 on the requeue signal; state saved in {folder / 'out' / STATE_FILE}" in output
        assert f"job {job_id} requeued, it resumes from there" in output
    assert "from step 2 (8 images seen)" in output
    assert "Traceback" not in output, output  # each process stops with its one line
    result = assert_same_calibration(folder / "out", single, world_size=2)
    assert result["extra"]["steps"] == 3


def test_dead_rank_fails_the_job_fast_and_a_rerun_completes(cluster, tmp_path, shards, single):
    """Rank 1 is SIGKILLed after step 2: the job fails at once (srun --kill-on-bad-exit), far inside
    its 5 min limit, and names the dead task; the same submission then resumes and finishes."""
    folder = tmp_path / "job"
    recipe_file(folder, shards)
    options = ("--nodes=2", "--ntasks-per-node=1", "--time=5")
    started = time.monotonic()
    job_id = submit(cluster, folder, *options, DYMU_FAULT_KILL_AFTER_STEP="2", DYMU_FAULT_RANK="1")
    info = wait(cluster, job_id, timeout=120)
    failed_after = time.monotonic() - started
    output = log(folder, job_id)
    assert info["JobState"] == "FAILED", output
    assert failed_after < 60, f"the job took {failed_after:.0f} s to fail"
    assert re.search(rf"srun: error: {NODES[1]}: task 1: Killed", output), output
    assert f"error: calibration failed on job {job_id}" in output and "it resumes from" in output
    assert "Traceback" not in output, output  # the others stop with one line each, not Lightning's traceback
    assert not (folder / "out" / "thresholds.json").exists() and steps_saved(folder / "out") == 2

    again = submit(cluster, folder, *options)
    assert wait(cluster, again)["JobState"] == "COMPLETED", log(folder, again)
    assert "from step 2 (8 images seen)" in log(folder, again)
    assert_same_calibration(folder / "out", single, world_size=2)


def test_hung_rank_fails_the_job_after_the_timeout(cluster, tmp_path, shards):
    """Rank 1 hangs after step 2 (alive, connected, silent): with trainer.timeout_s=15 rank 0's
    all-gather gives up and the job fails with a message that says what happened and how to resume."""
    folder = tmp_path / "job"
    recipe_file(folder, shards)
    job_id = submit(
        cluster,
        folder,
        "--nodes=2",
        "--ntasks-per-node=1",
        overrides=("trainer.timeout_s=15",),
        DYMU_FAULT_STALL_AFTER_STEP="2",
        DYMU_FAULT_RANK="1",
    )
    info = wait(cluster, job_id, timeout=180)
    output = log(folder, job_id)
    assert info["JobState"] == "FAILED", output
    assert (
        "error: rank 1 did not reach global step 3: died, or hung longer than trainer.timeout_s (seen by rank 0, "
        "whose all-gather failed). Rerun the same command to resume from "
        f"{folder / 'out' / STATE_FILE}"
    ) in output
    assert steps_saved(folder / "out") == 2


def test_torchrun_across_two_nodes_equals_one_process(cluster, tmp_path, shards, single):
    """`torchrun --nnodes=2 --nproc-per-node=1`, one launcher on each node's namespace, no Slurm."""
    folder = tmp_path / "job"
    recipe = recipe_file(folder, shards)
    env = {k: v for k, v in cluster.items() if not k.startswith("SLURM_")}
    env.update(PYTHONUNBUFFERED="1", TORCH_CPP_LOG_LEVEL="ERROR")
    launchers = []
    for node_rank, node in enumerate(NODES):
        command = [
            str(SCRIPTS / "on-node.sh"), node,
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            f"--node-rank={node_rank}", f"--master-addr={NODES[0]}", "--master-port=29517",
            "-m", "dymu_lightning", f"recipe={recipe}",
            "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp",
        ]  # fmt: skip
        out = open(folder / f"{node}.log", "w")  # noqa: SIM115 - closed below, after the process ends
        launchers.append((subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), out))
    for launcher, out in launchers:
        try:
            launcher.wait(timeout=240)
        finally:
            launcher.kill()
            out.close()
    logs = {node: (folder / f"{node}.log").read_text() for node in NODES}
    assert [launcher.returncode for launcher, _ in launchers] == [0, 0], logs
    assert_same_calibration(folder / "out", single, world_size=2)


def test_torchrun_under_slurm_takes_the_ranks_from_torchrun(cluster, tmp_path, shards, single):
    """scripts/slurm/calibrate-torchrun.sbatch: one Slurm task, torchrun starts 2 processes in it.
    Slurm's variables say 1 task; the ranks must come from torchrun (world size 2), not from Slurm."""
    folder = tmp_path / "job"
    recipe_file(folder, shards)
    template = SCRIPTS / "calibrate-torchrun.sbatch"
    job_id = submit(cluster, folder, "--nodes=1", template=template, arguments=("2",))
    info = wait(cluster, job_id)
    output = log(folder, job_id)
    assert info["JobState"] == "COMPLETED", output
    assert f"on {NODES[0]}: 1 node(s) x 2 process(es) by torchrun" in output
    assert_same_calibration(folder / "out", single, world_size=2)
