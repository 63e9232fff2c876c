"""The hang watchdog (tokenformer_mp/watchdog.py): a rank stuck inside a step ends the job in seconds, with every
rank's stacks and the stuck rank named, instead of gloo's or NCCL's collective timeout that names nobody."""
import json
import os
import subprocess
import sys
import time

from tests.conftest import REPO, debug_overrides
from tests.runs import train
from tests.test_training import _args
from tokenformer_mp.config import load_config
from tokenformer_mp.parallel.local import _free_port, run_ranks
from tokenformer_mp.watchdog import HANG_EXIT, MIN_TIMEOUT_S, summary, timeout_for


def test_the_timeout_follows_the_step_time_after_warm_up():
    assert load_config("configs/debug.yaml").hang_timeout() == 300  # half of parallel.timeout_s 600, at most 300
    assert load_config("configs/debug.yaml", {"parallel.timeout_s": 60}).hang_timeout() == 30
    assert timeout_for(300, []) == 1200  # a process's first step: compilation, communicators
    assert timeout_for(300, [1.0] * 4) == 300  # warm-up: the configured timeout
    assert timeout_for(300, [1.0] * 4 + [2.5]) == MIN_TIMEOUT_S  # fast steps: the floor
    assert timeout_for(300, [12.0] * 5) == 120  # 10x the slowest step
    assert timeout_for(300, [50.0] * 5) == 300  # never above the configured one


def test_a_rank_stuck_in_its_forward_is_named_with_every_stack(sample, tmp_path):
    """DP=2, rank 1 sleeps inside its forward of step 3; train.hang_timeout_s 10 under parallel.timeout_s 60: both
    ranks exit 4 within the timeout plus 30 s of the step, rank 1 named as holding the step up with its stack at the
    sleep, rank 0's stack waiting in a collective."""
    hang_timeout = 10
    port = _free_port()
    args = _args(debug_overrides(sample, tmp_path, **{"train.steps": 6, "train.hang_timeout_s": hang_timeout,
                                                      "parallel.timeout_s": 60}))
    code = ("import sys; from tests.runs import main_with_stuck_forward; "
            "sys.exit(main_with_stuck_forward(sys.argv[1:], rank=1, call=5))")  # 2 micro-batches a step: step 3
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", code, "--config", "configs/debug.yaml", *args], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    outs = [p.communicate(timeout=180)[0] for p in procs]
    took = time.monotonic() - start
    assert [p.returncode for p in procs] == [HANG_EXIT, HANG_EXIT], "\n".join(o[-3000:] for o in outs)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2]
    summary = (tmp_path / "hang" / "summary.txt").read_text()
    assert summary.startswith("hang at step 3: held up by rank 1 on ") and "outside any collective: stuck" in summary
    reports = {r["rank"]: r for r in map(json.loads, summary.splitlines()[1:])}
    assert hang_timeout <= reports[0]["waited_s"] < hang_timeout + 5
    assert reports[0]["where"].startswith("in a collective")
    assert (reports[0]["forwards"], reports[1]["forwards"]) == (2, 1)  # rank 0 ran both micro-batches, rank 1 its 1st
    stuck = (tmp_path / "hang" / "rank1.txt").read_text()
    assert "outside any collective: stuck" in stuck and "in stuck" in stuck  # faulthandler: File ..., line N in stuck
    waiting = (tmp_path / "hang" / "rank0.txt").read_text()
    assert "in a collective" in waiting and "distributed_c10d.py" in waiting
    assert sum("error: hang at step 3: held up by rank 1" in o for o in outs) == 1
    assert took < 20 + hang_timeout + 30  # start-up and two steps (some 20 s here), then the timeout and the report


def test_the_sbatch_scripts_requeue_a_hang_once_then_fail(tmp_path):
    """slurm/lib.sh's tf_run after exit 4: the job is requeued (HANG_REQUEUES, default 1), and after the requeued
    run hangs again it fails with 4 (scontrol here records what it is asked)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "TF_STATE_DIR": str(tmp_path)}
    script = f'REPO={REPO}; source {REPO}/slurm/lib.sh; tf_run bash -c "exit {HANG_EXIT}"'
    runs = [subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [HANG_EXIT, HANG_EXIT], [r.stdout + r.stderr for r in runs]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
    assert "requeueing job 77 (hang requeue 1 of HANG_REQUEUES=1)" in runs[0].stdout
    assert "not requeued: 1 requeue(s) after a hang already" in runs[1].stdout


def test_a_healthy_run_is_bit_identical_with_the_watchdog_on_or_off(sample, tmp_path):
    kw = {"train.steps": 4}
    on = run_ranks(1, train, debug_overrides(sample, tmp_path / "on", **kw))[0]
    off = run_ranks(1, train, debug_overrides(sample, tmp_path / "off", **kw, **{"train.hang_timeout_s": 0}))[0]
    assert [(h["loss"], h["grad_norm"]) for h in on] == [(h["loss"], h["grad_norm"]) for h in off]
    assert not (tmp_path / "on" / "hang").exists()


def test_the_summary_names_the_ranks_behind(tmp_path):
    """On NCCL a collective returns at once: a rank waiting for another shows its next synchronisation, outside any
    collective, like the stuck one. The forward passes into the step tell them apart; with equal counts (a collective
    mismatch) the stacks do; a rank that never reported is named as such."""
    def report(rank, forwards, where):
        return {"rank": rank, "host": "n1", "pid": 1, "step": 7, "waited_s": 60.0, "forwards": forwards,
                "where": where}
    sync = "outside any collective: train_step (tokenformer_mp/train.py:316)"
    line = summary([report(0, 8, sync), report(1, 3, "outside any collective: forward (x.py:1)"), report(2, 8, sync)],
                   3, str(tmp_path))
    assert line.startswith("hang at step 7: held up by rank 1 on n1 (3 forward passes into the step; outside")
    assert "rank 0" not in line and "rank 2" not in line
    line = summary([report(0, 8, "in a collective: all_reduce (c10d.py:1)"), report(1, 8, sync)], 3, str(tmp_path))
    assert "held up by rank 1 on n1 (8 forward passes" in line and "rank 2 (no report" in line and "rank 0" not in line
    assert (tmp_path / "summary.txt").read_text().splitlines()[0] == line
