"""The straggler report (tokenformer_mp/straggler.py): the rank that sets the pace is named, with its host and lag."""
import json
import socket

import torch

from tests.conftest import debug_overrides
from tests.runs import train, train_with_slow_rank
from tokenformer_mp.checkpoint import load_tensors
from tokenformer_mp.parallel.local import run_ranks

DELAY_S = 0.4


def test_a_slow_rank_is_named_with_its_lag(sample, tmp_path):
    """Rank 1 of DP=2 sleeps DELAY_S before each forward (one a step): on every measured step it is the slowest rank,
    DELAY_S behind rank 0 within 20%, and a straggler; ranks.jsonl holds both ranks' figures."""
    kw = {"train.steps": 6, "train.log_interval": 2, "train.grad_accum_steps": 1}
    history = run_ranks(2, train_with_slow_rank, debug_overrides(sample, tmp_path, **kw), 1, DELAY_S)[0]
    measured = [h for h in history if "slowest_rank" in h]
    assert [h["step"] for h in measured] == [2, 4, 6]
    for h in measured:
        assert h["slowest_rank"] == 1 and h["slowest_host"] == socket.gethostname() and h["straggler"], h
        assert abs(h["slowest_lag_s"] - DELAY_S) <= 0.2 * DELAY_S, h
    rows = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert len(r["step_time_s"]) == len(r["input_wait_s"]) == len(r["ready_s"]) == 2
        # the step times are alike (rank 0 waits for rank 1 in the gradient reduction); the ready times are not
        assert abs(r["step_time_s"][0] - r["step_time_s"][1]) < 0.2 * DELAY_S, r
        assert r["ready_s"][1] - r["ready_s"][0] > 0.8 * DELAY_S, r


def test_a_healthy_run_is_bit_identical_with_the_guards_on_or_off(sample, tmp_path):
    """DP=2: the watchdog, the straggler report and the spike guard on (the defaults, judging from step 11) or all
    off: the same losses and grad norms and the same final checkpoint, bit for bit. (Whether a healthy run names a
    straggler is left to the machine: two ranks on two shared CPU cores can be 10% apart.)"""
    kw = {"train.steps": 14, "train.log_interval": 2, "checkpoint.save_interval": 14}
    on = run_ranks(2, train, debug_overrides(sample, tmp_path / "on", **kw))[0]
    off = run_ranks(2, train, debug_overrides(sample, tmp_path / "off", **kw, **{
        "train.hang_timeout_s": 0, "train.straggler_threshold": 0, "train.spike_loss_factor": 0,
        "train.spike_grad_norm_factor": 0}))[0]
    assert [(h["loss"], h["grad_norm"]) for h in on] == [(h["loss"], h["grad_norm"]) for h in off]
    assert [h["step"] for h in on if "slowest_rank" in h] == list(range(2, 15, 2))
    assert not any("spike" in h for h in on)
    assert not any("slowest_rank" in h for h in off) and not (tmp_path / "off" / "ranks.jsonl").exists()
    for key in ("weight", "exp_avg", "exp_avg_sq"):
        a, b = (load_tensors(str(tmp_path / run / "checkpoints"), key) for run in ("on", "off"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), key
