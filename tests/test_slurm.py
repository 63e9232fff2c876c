"""The slurm/*.sbatch scripts on a real Slurm: the localhost cluster of ../shared/slurm-localhost (nodes n1 and n2,
2 CPUs each; slurm/ci_up.sh brings it up). Skipped, saying why, when no Slurm answers.

Two emulated nodes x 2 tasks = 4 ranks at TP=2 x PP=2 on the corpus: train, reshard + expand and continue, preemption
(SIGUSR1 -> checkpoint -> requeue -> resume, losses equal to the uninterrupted run; srun and torchrun launchers), a
bad config failing the job, and srun --mpi=pmix. Jobs run with --chdir at this checkout and PYTHON set to the
interpreter running the tests.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import debug_overrides

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
STEPS = 20  # the uninterrupted run (a) and the preempted ones (c): enough steps for a signal to land mid-run
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def _slurm_problem() -> str | None:
    for tool in ("sbatch", "sinfo", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"no Slurm here: `{tool}` is not on PATH (slurm/ci_up.sh brings up a localhost cluster)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm does not answer: {e}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"`scontrol ping`: slurmctld is not up ({(ping.stdout + ping.stderr).strip()})"
    usable = {line.split()[0] for line in nodes.stdout.splitlines()
              if len(line.split()) == 2 and not re.match(r"(down|drain|fail|unk)", line.split()[1])}
    if nodes.returncode != 0 or len(usable) < 2:
        return f"`sinfo`: fewer than 2 usable nodes ({nodes.stdout.strip() or nodes.stderr.strip()})"
    return None


_PROBLEM = _slurm_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


def _has_pmix() -> bool:
    out = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True)
    return "pmix" in out.stdout + out.stderr


# --- jobs ---------------------------------------------------------------------------------------------------------

def _cli(overrides: dict) -> list[str]:
    """{'train.steps': 3, 'data.prefixes': ['p']} -> ['--train.steps', '3', '--data.prefixes', '[p]']"""
    args = []
    for key, value in overrides.items():
        if isinstance(value, (list, tuple)):
            value = "[" + ", ".join(str(v) for v in value) + "]"
        args += [f"--{key}", str(value)]
    return args


def _job_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, **extra)  # the checkout may have no .venv: the scripts' PYTHON, explicitly
    return env


class Job:
    def __init__(self, script: str, args: list[str], log: Path, sbatch: tuple = (), **env):
        self.log = log
        cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", *sbatch, str(SLURM / script), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, env=_job_env(**env), timeout=30)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        self.id = out.stdout.strip().split(";")[0]
        _SUBMITTED.append(self.id)

    def info(self) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True).stdout
        return {k: re.search(rf"\b{k}=(\S*)", out).group(1) if re.search(rf"\b{k}=(\S*)", out) else None
                for k in ("JobState", "Reason", "ExitCode", "Restarts")}

    def wait(self, timeout: float = 240, poll=None) -> dict:
        """Until the job ends, requeues included; poll(job) runs between checks.

        Slurm holds a requeued job for CredExpire (120 s by default) so that it cannot start while the nodes still
        revoke the old run's credential (a start within the same second is killed: "Job credential revoked").
        The tests release it sooner: once the nodes are done with the old run, and 3 s after the requeue."""
        deadline = time.monotonic() + timeout
        held_since = None
        while True:
            info = self.info()
            if info["JobState"] in TERMINAL:
                return info
            if info["JobState"] == "PENDING" and info["Reason"] == "BeginTime" and int(info["Restarts"] or 0) > 0:
                held_since = held_since or time.monotonic()
                states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout
                if time.monotonic() - held_since > 3 and "comp" not in states:
                    subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"], capture_output=True)
            else:
                held_since = None
            if poll is not None:
                poll(self)
            if time.monotonic() > deadline:
                subprocess.run(["scancel", self.id])
                pytest.fail(f"job {self.id} still {info} after {timeout} s; log:\n{self.text()[-4000:]}")
            time.sleep(0.2)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


_SUBMITTED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _cancel_leftovers():
    yield
    for jid in _SUBMITTED:  # a failed assertion must not leave jobs holding the nodes
        subprocess.run(["scancel", jid], capture_output=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def _steps_done(run_dir: Path) -> int:
    """Complete lines of metrics.jsonl while rank 0 may be writing one."""
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _overrides(corpus, run_dir, **kw) -> dict:
    return debug_overrides(corpus, run_dir, **{"parallel.tp": 2, "parallel.pp": 2, **kw})


TWO_BY_TWO = ("--nodes=2", "--ntasks-per-node=2")


# --- (a) two nodes x two tasks, TP=2 x PP=2 -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_a")
    job = Job("pretrain.sbatch", ["configs/debug.yaml", *_cli(_overrides(corpus, tmp / "run", **{"train.steps": STEPS}))],
              tmp / "job.out", TWO_BY_TWO)
    info = job.wait()
    return {"job": job, "info": info, "run": tmp / "run", "tmp": tmp}


def test_pretrain_two_nodes_tp2_pp2(pretrained):
    job, info, run = pretrained["job"], pretrained["info"], pretrained["run"]
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.text()[-4000:]
    log = job.text()
    assert "launcher=srun world_size=4" in log and "2 node(s) [n[1-2]] x 2 task(s)" in log
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert f"step {STEPS:>6}/{STEPS}" in log  # rank 0's progress lines are in the job's output
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"global_step{STEPS}"
    manifest = json.loads((run / "checkpoints" / tag / "manifest.json").read_text())
    assert manifest["source_layout"] == {"tp": 2, "pp": 2, "dp": 1} and manifest["step"] == STEPS


# --- (b) reshard + expand as a job, then continue training from it --------------------------------------------------

def test_reshard_expand_and_continue(pretrained, corpus, tmp_path):
    assert pretrained["info"]["ExitCode"] == "0:0"
    dst = tmp_path / "expanded"
    job = Job("reshard.sbatch", ["--load", str(pretrained["run"] / "checkpoints"), "--save", str(dst),
                                 "--tp", "1", "--pp", "1", "--expand-factor", "2"], tmp_path / "reshard.out")
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.text()[-3000:]
    old = json.loads((pretrained["run"] / "checkpoints" / f"global_step{STEPS}" / "manifest.json")
                     .read_text())["model"]
    new = json.loads((dst / "manifest.json").read_text())["model"]
    kinds = ("qkv", "proj", "ffn")
    assert {k: new[f"{k}_tokens"] for k in kinds} == {k: 2 * old[f"{k}_tokens"] for k in kinds}
    assert {k: new[f"{k}_scale_tokens"] for k in kinds} == {k: old[f"{k}_tokens"] for k in kinds}

    # Continue on one task (slurm/debug.sbatch) at TP=1: token counts doubled, tau pinned to the old counts.
    grown = {f"model.{k}_{what}": new[f"{k}_{what}"] for k in kinds for what in ("tokens", "scale_tokens")}
    run = tmp_path / "continued"
    job = Job("debug.sbatch", _cli(debug_overrides(corpus, run, **{"train.steps": 2, "checkpoint.load": str(dst),
                                                                     **grown})), tmp_path / "continue.out")
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.text()[-4000:]
    assert f"resumed from {dst}" in job.text()
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # The trained weights came along: far below the untrained model's loss on the same first batch.
    assert rows[0]["loss"] < _metrics(pretrained["run"])[0]["loss"] - 0.3


# --- (c) preemption: SIGUSR1 -> checkpoint -> requeue -> resume, same losses as the uninterrupted run ---------------

PREEMPT = {  # how the signal arrives, and through which launcher
    # `scancel --batch`: the batch shell only, as `#SBATCH --signal=B:USR1@T` does; the script forwards it to srun.
    "srun-batch-shell": ({}, ["--batch"]),
    # plain `scancel --signal`: every process of the step, as the default `#SBATCH --signal=USR1@120` does;
    # under torchrun, slurm/torchrun_node.sh keeps the agents alive and turns their exit 1 back into 124.
    "torchrun-steps": ({"LAUNCHER": "torchrun"}, []),
}


@pytest.mark.parametrize("how", list(PREEMPT))
def test_preemption_checkpoints_requeues_and_resumes_exactly(how, pretrained, corpus, tmp_path):
    env, scancel_flags = PREEMPT[how]
    run = tmp_path / "run"
    job = Job("pretrain.sbatch", ["configs/debug.yaml", *_cli(_overrides(corpus, run, **{"train.steps": STEPS}))],
              tmp_path / "job.out", TWO_BY_TWO, **env)
    sent = []

    def signal_after_two_steps(j):
        if not sent and _steps_done(run) >= 2:
            subprocess.run(["scancel", *scancel_flags, "--signal=USR1", j.id], check=True)
            sent.append(_steps_done(run))

    info = job.wait(poll=signal_after_two_steps)
    log = job.text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    stopped = re.search(r"checkpoint saved at step (\d+), exiting", log)
    assert sent and stopped, f"the signal (sent after step {sent}) did not interrupt the run:\n{log[-5000:]}"
    stopped = int(stopped.group(1))
    assert 2 <= stopped < STEPS and int(info["Restarts"]) == 1, log[-5000:]
    assert "requeueing job" in log and f"resumed from {run / 'checkpoints'} at step {stopped}" in log
    if "--batch" in scancel_flags:
        assert "batch shell got SIGUSR1" in log
    rows, ref = _metrics(run), _metrics(pretrained["run"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, across the two runs
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # CPU fp32, same layout: bit for bit
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in ref]


# --- (d) a bad config fails the job with the trainer's message -------------------------------------------------------

def test_bad_config_fails_the_job(corpus, tmp_path):
    job = Job("pretrain.sbatch", ["configs/debug.yaml", *_cli(debug_overrides(corpus, tmp_path / "run")),
                                  "--train.stepz", "3"], tmp_path / "job.out")
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    log = job.text()
    assert "error: configs/debug.yaml: train.stepz: unknown key (did you mean train.steps?)" in log
    assert "config error" in log


# --- srun --mpi=pmix (PMIx wire-up; ranks still from SLURM_*) ------------------------------------------------------

def test_srun_mpi_pmix_computes_the_same_steps(pretrained, corpus, tmp_path):
    if not _has_pmix():
        pytest.skip("srun has no pmix plugin (bring the cluster up with WITH_MPI=1)")
    run = tmp_path / "run"
    job = Job("pretrain.sbatch", ["configs/debug.yaml", *_cli(_overrides(corpus, run, **{"train.steps": 3}))],
              tmp_path / "job.out", TWO_BY_TWO, WITH_MPI="1")
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.text()[-4000:]
    assert re.search(r"launch: srun( --[\w-]+=\S+)* --mpi=pmix", job.text())
    # Warmup is 2 steps and the cosine starts at the full rate, so steps 1-3 do not depend on train.steps.
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(pretrained["run"])[:3]]
