"""The spike guard (tokenformer_mp/spike_guard.py): a bad batch's step is not applied, on every rank alike; repeated
spikes roll the run back past their data, and every later resume (a restart after kill -9, another layout) honours
the skip. The bad batch is data: the samples of chosen steps hold one token repeated (tests.runs.SpikyDataset)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, debug_overrides
from tests.runs import train_with_spikes
from tests.test_training import _args
from tokenformer_mp.checkpoint import load_tensors
from tokenformer_mp.parallel.local import run_ranks
from tokenformer_mp.spike_guard import MIN_HISTORY, SpikeGuard

G = 8  # the global batch: samples [s*G, (s+1)*G) are step s+1's
OFF = {"train.spike_loss_factor": 0, "train.spike_grad_norm_factor": 0}


def _overrides(sample, run_dir, **kw) -> dict:
    return debug_overrides(sample, run_dir, **{"train.global_batch_size": G, "train.grad_accum_steps": None, **kw})


def _steps(samples: tuple[int, int]) -> list[int]:
    return list(range(samples[0] // G + 1, samples[1] // G + 1))


def test_the_guard_judges_against_the_recent_median():
    g = SpikeGuard(loss_factor=1.5, grad_norm_factor=10, window=20, max_skips=2, max_rollbacks=1)
    for s in range(MIN_HISTORY - 1):
        g.record(s, 3.0, 1.0, spike=False)
    assert g.judge(100.0, 100.0) is None  # too little history yet
    g.record(MIN_HISTORY, 3.0, 1.0, spike=False)
    assert (g.judge(4.4, 9.9), g.judge(4.6, 9.9), g.judge(3.0, 10.1), g.judge(None, None)) == \
        (None, "loss", "grad_norm", None)
    g.record(11, 9.0, 50.0, spike=True)
    assert not g.must_roll_back() and list(g.norms)[-1] == 1.0  # a spike does not join the statistics
    g.record(40, 9.0, 50.0, spike=True)  # the first spike has left the window
    assert not g.must_roll_back()
    g.record(41, 9.0, 50.0, spike=True)
    assert g.must_roll_back()


@pytest.mark.parametrize("world,layout", [(1, {}), (2, {}), (4, {"parallel.tp": 2, "parallel.pp": 2})],
                         ids=["one_process", "dp2", "tp2_pp2"])
def test_a_bad_batch_is_skipped_on_every_rank(sample, tmp_path, world, layout):
    """Step 12's samples are bad: every rank records it as a spike with those samples, the weights and Adam's state
    after it are those before it, bit for bit, and the run finishes. With the guard off the same step is applied
    (the checkpoints differ) and every later loss changes, so the test can fail."""
    bad = (11 * G, 12 * G)
    kw = {"train.steps": 14, "checkpoint.save_interval": 1, "checkpoint.keep_last": 0, **layout}
    on = run_ranks(world, train_with_spikes, _overrides(sample, tmp_path / "on", **kw), [bad])
    off = run_ranks(world, train_with_spikes, _overrides(sample, tmp_path / "off", **kw, **OFF), [bad])[0]
    for rank in on:
        spikes = [h for h in rank["history"] if "spike" in h]
        assert [(h["step"], h["samples"]) for h in spikes] == [(12, list(bad))], spikes
        assert [h["step"] for h in rank["history"]] == list(range(1, 15))
    lines = [json.loads(line) for line in (tmp_path / "on" / "spikes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"], r["spike"]) for r in lines] == [(12, list(bad), "grad_norm")]
    for key in ("weight", "exp_avg", "exp_avg_sq"):
        before, after = (load_tensors(str(tmp_path / "on" / "checkpoints" / f"global_step{s}"), key) for s in (11, 12))
        assert all(torch.equal(before[n], after[n]) for n in before), key
    on0 = on[0]["history"]
    assert [h["loss"] for h in on0[:12]] == [h["loss"] for h in off["history"][:12]]
    assert all(a["loss"] != b["loss"] for a, b in zip(on0[12:], off["history"][12:]))
    weights = [load_tensors(str(tmp_path / "off" / "checkpoints" / f"global_step{s}")) for s in (11, 12)]
    assert not all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_repeated_spikes_roll_back_and_every_resume_skips_their_data(sample, tmp_path):
    """Steps 12 and 13 are bad, two spikes roll back: to step 10 (the newest checkpoint), samples [80, 104) skipped
    (the data of steps 11-13), recorded in the run directory and the next checkpoints. The run finishes without
    meeting them again, and a resume at DP=2 reads none of them either."""
    bad = [(11 * G, 13 * G)]
    kw = {"train.steps": 16, "checkpoint.save_interval": 10, "train.spike_max_skips": 2}
    first = run_ranks(1, train_with_spikes, _overrides(sample, tmp_path, **kw), bad)[0]
    steps = [h["step"] for h in first["history"]]
    assert steps == list(range(1, 14)) + list(range(11, 17)), steps
    assert [h["step"] for h in first["history"] if "spike" in h] == [12, 13]
    assert first["skipped"] == [(10 * G, 13 * G)]
    assert json.loads((tmp_path / "skipped_samples.json").read_text()) == {"ranges": [[10 * G, 13 * G]]}
    assert all(not 10 * G <= s < 13 * G for s in first["starts"][10:])
    events = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [e.get("event") for e in events] == [None, None, "rollback"] and events[2]["to_step"] == 10
    manifest = json.loads((tmp_path / "checkpoints" / "global_step16" / "manifest.json").read_text())
    assert manifest["skipped_samples"] == [[10 * G, 13 * G]]
    # the same run continued at DP=2 (the same global batch): still no step reads the skipped samples
    (tmp_path / "skipped_samples.json").unlink()  # the checkpoint's record alone suffices
    more = run_ranks(2, train_with_spikes, _overrides(sample, tmp_path, **{**kw, "train.steps": 20}), bad)
    for rank in more:
        assert [h["step"] for h in rank["history"]] == [17, 18, 19, 20] and rank["skipped"] == [(80, 104)]
        assert not any("spike" in h for h in rank["history"])


def test_a_restart_after_kill_9_honours_the_rollback_and_too_many_rollbacks_exit_3(sample, tmp_path):
    """kill -9 as soon as a rollback is recorded: the same command again resumes at the checkpoint and skips the data
    (it meets no spike). With data bad for many steps, the rollback after spike_max_rollbacks ends the run, exit 3."""
    ov = debug_overrides(sample, tmp_path / "run", **{"train.steps": 16, "checkpoint.save_interval": 10,
                                                      "train.spike_max_skips": 2})
    bad = [(11 * 4, 13 * 4)]  # the debug overrides' global batch is 4
    code = f"import sys; from tests.runs import main_with_spikes as m; sys.exit(m(sys.argv[1:], {bad!r}))"
    cmd = [sys.executable, "-c", code, "--config", "configs/debug.yaml", *_args(ov)]
    record = tmp_path / "run" / "skipped_samples.json"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert record.exists(), out[-3000:]
    spikes_before = (tmp_path / "run" / "spikes.jsonl").read_text()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "samples [[40, 52]] are skipped" in res.stdout, res.stdout[-3000:]
    assert (tmp_path / "run" / "spikes.jsonl").read_text() == spikes_before  # no spike met again

    ov = debug_overrides(sample, tmp_path / "bad", **{"train.steps": 30, "checkpoint.save_interval": 10,
                                                      "train.spike_max_skips": 2, "train.spike_max_rollbacks": 1})
    code = "import sys; from tests.runs import main_with_spikes as m; sys.exit(m(sys.argv[1:], [(44, 120)]))"
    res = subprocess.run([sys.executable, "-c", code, "--config", "configs/debug.yaml", *_args(ov)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
    assert "spikes within train.spike_window 100 steps; 1 rollback(s) already (train.spike_max_rollbacks 1): " \
           "stopping" in res.stderr, res.stderr[-2000:]
    assert os.path.exists(tmp_path / "bad" / "checkpoints" / "global_step10" / "manifest.json")
