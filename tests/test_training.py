"""The trainer end to end on real text: loss falls, every layout computes the same model, resume is exact."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, assert_close_to_scale, debug_overrides
from tokenformer_mp.checkpoint import read_latest
from tokenformer_mp.parallel.local import run_ranks
from tests.runs import train


def _run(world: int, overrides: dict) -> list[dict]:
    return run_ranks(world, train, overrides)[0]


def test_debug_training_loss_falls(corpus, tmp_path):
    hist = _run(1, debug_overrides(corpus, tmp_path, **{
        "train.steps": 60, "train.micro_batch_size": 8, "train.grad_accum_steps": 1, "train.warmup_steps": 5,
        "train.eval_interval": 30, "train.eval_iters": 2, "train.log_interval": 10}))
    first, last = sum(h["loss"] for h in hist[:5]) / 5, sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 1.0, (first, last)
    vals = [h["val_loss"] for h in hist if "val_loss" in h]
    assert len(vals) == 2 and vals[1] < vals[0]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])
    assert os.path.getsize(tmp_path / "loss.png") > 10_000


LAYOUTS = {  # name: (world size, overrides); all with the same global batch as the baseline
    "tp2": (2, {"parallel.tp": 2}),
    "pp2": (2, {"parallel.pp": 2}),
    "dp2_zero1": (2, {"train.grad_accum_steps": 1}),
    "dp2_zero2": (2, {"train.grad_accum_steps": 1, "parallel.zero_stage": 2}),
    "dp2_overlap_grad_reduce": (2, {"train.grad_accum_steps": 1, "parallel.overlap_grad_reduce": True,
                                    "parallel.grad_bucket_size": 100_000}),
    "tp2_pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
    "tp2_activation_checkpointing": (2, {"parallel.tp": 2, "train.activation_checkpointing": True}),
    "pp2_activation_checkpointing": (2, {"parallel.pp": 2, "train.activation_checkpointing": True}),
    "tp2_fused_pattention": (2, {"parallel.tp": 2, "train.fused_pattention": True}),
    "tp2_recompute_pattention_gelu": (2, {"parallel.tp": 2, "train.recompute_pattention_gelu": True}),
    # train.compile: the Pattention options inside the compiled graph; activation recomputation calling it again,
    # in the plain model (at CP=2: K and V gathered, the causal chunks) and on pipeline stages; TP collectives traced
    # into it, with and without sequence parallelism
    "compile_fused_recompute_gelu": (1, {"train.compile": True, "train.fused_pattention": True,
                                         "train.recompute_pattention_gelu": True}),
    "cp2_compile_checkpointing": (2, {"parallel.cp": 2, "train.compile": True,
                                      "train.activation_checkpointing": True}),
    "tp2_pp2_compile_checkpointing": (4, {"parallel.tp": 2, "parallel.pp": 2, "train.compile": True,
                                          "train.activation_checkpointing": True}),
    "tp2_sequence_parallel_compile": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True,
                                          "train.compile": True}),
    "tp2_sequence_parallel": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "tp2_pp2_sequence_parallel": (4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}),
    "tp2_pp2_sequence_parallel_checkpointing": (4, {"parallel.tp": 2, "parallel.pp": 2,
                                                    "parallel.sequence_parallel": True,
                                                    "train.activation_checkpointing": True}),
}


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    return _run(1, debug_overrides(corpus, tmp_path_factory.mktemp("base"), **{"train.steps": 3}))


def _assert_same(hist, ref, rel=1e-5):
    assert len(hist) == len(ref) == 3
    for h, r in zip(hist, ref):
        assert abs(h["loss"] - r["loss"]) <= rel * abs(r["loss"]), (h["step"], h["loss"], r["loss"])
        assert abs(h["grad_norm"] - r["grad_norm"]) <= rel * abs(r["grad_norm"]), (h["step"], h["grad_norm"], r["grad_norm"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_one_process(name, corpus, baseline, tmp_path):
    world, extra = LAYOUTS[name]
    hist = _run(world, debug_overrides(corpus, tmp_path, **{"train.steps": 3, **extra}))
    _assert_same(hist, baseline)


TRANSFORMER = "configs/transformer-debug.yaml"
# The Transformer baseline under every layout above but the Pattention kernels' options (its own TP plan, SP's
# gathers, the pipeline's stages, ZeRO's partitions and overlapped reduction, recomputation, its blocks compiled with
# the TP collectives traced in), and CP's chunks without compile too
PATTENTION_ONLY = {"train.fused_pattention", "train.recompute_pattention_gelu"}
TRANSFORMER_LAYOUTS = {name: layout for name, layout in LAYOUTS.items() if not PATTENTION_ONLY & set(layout[1])}
TRANSFORMER_LAYOUTS["cp2"] = (2, {"parallel.cp": 2})


@pytest.fixture(scope="module")
def transformer_baseline(corpus, tmp_path_factory):
    return run_ranks(1, train, debug_overrides(corpus, tmp_path_factory.mktemp("tbase"), **{"train.steps": 3}),
                     TRANSFORMER)[0]


@pytest.mark.parametrize("name", list(TRANSFORMER_LAYOUTS))
def test_transformer_layout_equals_one_process(name, corpus, transformer_baseline, baseline, tmp_path):
    """configs/transformer-debug.yaml at each layout: losses and grad norms within 1e-5 of one process, as the
    TokenFormer's; and another model than the TokenFormer (the comparison is between two functions)."""
    world, extra = TRANSFORMER_LAYOUTS[name]
    hist = run_ranks(world, train, debug_overrides(corpus, tmp_path, **{"train.steps": 3, **extra}), TRANSFORMER)[0]
    _assert_same(hist, transformer_baseline)
    assert abs(transformer_baseline[0]["loss"] - baseline[0]["loss"]) > 1e-3


def test_transformer_with_documents_at_cp2_pp2_equals_one_process(corpus, tmp_path):
    """Documents kept apart (positions and document ids sent between stages, masks over CP's chunks)."""
    kw = {"train.steps": 3, "data.reset_attention_mask": True, "data.reset_position_ids": True}
    ref = run_ranks(1, train, debug_overrides(corpus, tmp_path / "a", **kw), TRANSFORMER)[0]
    hist = run_ranks(4, train, debug_overrides(corpus, tmp_path / "b", **kw, **{"parallel.cp": 2, "parallel.pp": 2}),
                     TRANSFORMER)[0]
    _assert_same(hist, ref)


def test_transformer_resharded_checkpoint_resumes_at_another_layout(corpus, tmp_path):
    """A Transformer stopped after 3 steps at TP=2, resharded by the tool to TP=2 x PP=2 (the layout-free copy, Adam
    state included), continues there as the run that never stopped: losses within 1e-5."""
    from tokenformer_mp.reshard import reshard
    kw = {"train.steps": 6}
    ref = run_ranks(1, train, debug_overrides(corpus, tmp_path / "a", **kw), TRANSFORMER)[0]
    run_ranks(2, train, debug_overrides(corpus, tmp_path / "b", **kw, **{"train.exit_after_steps": 3,
                                                                        "parallel.tp": 2}), TRANSFORMER)
    reshard(str(tmp_path / "b" / "checkpoints"), str(tmp_path / "moved"), tp=2, pp=2, progress=False)
    rest = run_ranks(4, train, debug_overrides(corpus, tmp_path / "c", **kw, **{
        "parallel.tp": 2, "parallel.pp": 2, "checkpoint.load": str(tmp_path / "moved")}), TRANSFORMER)[0]
    assert [h["step"] for h in rest] == [4, 5, 6]
    for h, r in zip(rest, ref[3:]):
        assert abs(h["loss"] - r["loss"]) <= 1e-5 * r["loss"], (h["step"], h["loss"], r["loss"])
        assert abs(h["grad_norm"] - r["grad_norm"]) <= 1e-5 * r["grad_norm"], (h["step"], h["grad_norm"], r["grad_norm"])


def _dp_reductions(overrides: dict) -> list[bool]:
    """For each gradient all-reduce of one step (DP only: every non-scalar all-reduce is one), whether it ran inside
    backward."""
    import torch.distributed as dist

    from tokenformer_mp.config import load_config
    from tokenformer_mp.trainer import Trainer, shutdown
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    inside, all_reduce = [], dist.all_reduce

    def recorded(tensor, *args, **kwargs):
        if tensor.numel() > 1:
            inside.append(torch._C._current_autograd_node() is not None)
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = recorded
    try:
        trainer.train_step()
    finally:
        dist.all_reduce = all_reduce
    shutdown()
    return inside


@pytest.mark.parametrize("stage", [1, 2])
def test_overlapped_gradient_reduction_runs_inside_backward(corpus, tmp_path, stage):
    """parallel.overlap_grad_reduce: the DP gradients go in buckets of grad_bucket_size elements, each reduced from
    inside backward as it fills, the last partial one after it (655k parameters in buckets of 200k: 4 reductions);
    without it one reduction, after backward."""
    kw = {"train.grad_accum_steps": 1, "parallel.zero_stage": stage}
    plain = run_ranks(2, _dp_reductions, debug_overrides(corpus, tmp_path / "a", **kw))[0]
    overlapped = run_ranks(2, _dp_reductions, debug_overrides(corpus, tmp_path / "b", **kw, **{
        "parallel.overlap_grad_reduce": True, "parallel.grad_bucket_size": 200_000}))[0]
    assert plain == [False], plain
    assert overlapped == [True, True, True, False], overlapped


def test_uneven_token_counts_at_tp4(corpus, tmp_path):
    uneven = {"train.steps": 3, "model.qkv_tokens": 126, "model.proj_tokens": 66, "model.ffn_tokens": 510}
    ref = _run(1, debug_overrides(corpus, tmp_path / "a", **uneven))
    hist = _run(4, debug_overrides(corpus, tmp_path / "b", **uneven, **{"parallel.tp": 4}))
    _assert_same(hist, ref)


def test_resume_is_exact(corpus, tmp_path):
    """Stop at step 3 (checkpoint), start again: steps 4-6 equal the run that never stopped, bit for bit."""
    kw = {"train.steps": 6}
    ref = _run(1, debug_overrides(corpus, tmp_path / "a", **kw))
    first = _run(1, debug_overrides(corpus, tmp_path / "b", **kw, **{"train.exit_after_steps": 3}))
    assert [h["step"] for h in first] == [1, 2, 3]
    rest = _run(1, debug_overrides(corpus, tmp_path / "b", **kw))
    assert [h["step"] for h in rest] == [4, 5, 6]
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in ref]
    assert [h["grad_norm"] for h in first + rest] == [h["grad_norm"] for h in ref]


def test_requeued_run_continues_from_its_own_checkpoint_not_its_starting_one(corpus, tmp_path):
    """A run started from checkpoint.load (as after a growth), stopped, and started again with the same command (as
    Slurm requeues it) continues from its own checkpoint, and equals the run that never stopped."""
    _run(1, debug_overrides(corpus, tmp_path / "start", **{"train.steps": 2}))
    kw = {"train.steps": 6, "checkpoint.load": str(tmp_path / "start" / "checkpoints")}
    ref = _run(1, debug_overrides(corpus, tmp_path / "a", **kw))
    assert [h["step"] for h in ref] == [3, 4, 5, 6]
    first = _run(1, debug_overrides(corpus, tmp_path / "b", **kw, **{"train.exit_after_steps": 2}))
    rest = _run(1, debug_overrides(corpus, tmp_path / "b", **kw))
    assert [h["step"] for h in first] == [3, 4] and [h["step"] for h in rest] == [5, 6]
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in ref]


def test_resume_at_another_layout(corpus, tmp_path):
    """A TP=1 checkpoint continues at TP=2 x PP=2 (layout-free copy, Adam state included) like the unbroken run."""
    kw = {"train.steps": 6}
    ref = _run(1, debug_overrides(corpus, tmp_path / "a", **kw))
    _run(1, debug_overrides(corpus, tmp_path / "b", **kw, **{"train.exit_after_steps": 3}))
    rest = _run(4, debug_overrides(corpus, tmp_path / "b", **kw, **{"parallel.tp": 2, "parallel.pp": 2}))
    assert [h["step"] for h in rest] == [4, 5, 6]
    for h, r in zip(rest, ref[3:]):
        assert abs(h["loss"] - r["loss"]) <= 1e-5 * r["loss"]


def test_global_batch_gives_the_same_steps_at_any_data_parallel_size(corpus, tmp_path):
    """train.global_batch_size 4 of micro-batches of 2: 2 accumulation steps on one rank, 1 on two; each step reads
    the same samples whatever DP is, so a run stopped at DP=1 continues at DP=2 as the run that never stopped (losses
    and grad norms within 1e-5; steps at DP=2 from the start: the layout tests)."""
    kw = {"train.steps": 4, "train.global_batch_size": 4, "train.grad_accum_steps": None}
    ref = _run(1, debug_overrides(corpus, tmp_path / "a", **kw))
    _run(1, debug_overrides(corpus, tmp_path / "b", **kw, **{"train.exit_after_steps": 2}))
    rest = _run(2, debug_overrides(corpus, tmp_path / "b", **kw))
    assert [h["step"] for h in rest] == [3, 4]
    for h, r in zip(rest, ref[2:]):
        assert abs(h["loss"] - r["loss"]) <= 1e-5 * r["loss"], (h["step"], h["loss"], r["loss"])
        assert abs(h["grad_norm"] - r["grad_norm"]) <= 1e-5 * r["grad_norm"], (h["step"], h["grad_norm"], r["grad_norm"])


def _args(overrides: dict) -> list[str]:
    """Dotted overrides as command-line arguments."""
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    return out


def _bf16_run(overrides: dict) -> dict:
    """3 steps; DeepSpeed's gradient accumulation dtype and optimizer, and the dtypes of the data-parallel gradient
    reductions of the last step (every non-scalar collective on the data-parallel group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tokenformer_mp.config import load_config
    from tokenformer_mp.trainer import Trainer, shutdown
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    dp = tuple(dist.get_process_group_ranks(ps.get_data_parallel_group()))
    reduced, originals = [], {op: getattr(dist, op) for op in ("all_reduce", "reduce_scatter_single",
                                                                "reduce_scatter_tensor") if hasattr(dist, op)}

    def recorder(op):
        def recorded(*args, **kwargs):
            tensor, group = args[0] if args else kwargs["tensor"], kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
            if tensor.numel() > 1 and ranks == dp and len(dp) > 1:
                reduced.append(str(tensor.dtype))
            return originals[op](*args, **kwargs)
        return recorded
    hist = []
    for step in range(3):
        trainer.step = step  # the data position, as fit() keeps it
        if step == 2:
            for op in originals:
                setattr(dist, op, recorder(op))
        hist.append(trainer.train_step())
    for op, fn in originals.items():
        setattr(dist, op, fn)
    out = {"hist": hist, "accum": str(trainer.engine.get_data_types()[1]), "optimizer": type(trainer.optimizer).__name__,
           "reduced": sorted(set(reduced))}
    shutdown()
    return out


@pytest.mark.parametrize("world,layout,optimizer", [
    (4, {"parallel.tp": 2, "parallel.pp": 2}, "BF16_Optimizer"),  # pipeline + TP, fp32 gradient buffers
    (2, {"train.micro_batch_size": 1}, "BF16_Optimizer"),  # DP=2, ZeRO-1: fp32 all-reduce
    (2, {"train.micro_batch_size": 1, "parallel.zero_stage": 2}, "DeepSpeedZeroOptimizer"),  # fp32 partitions
    (2, {"train.micro_batch_size": 1, "parallel.grad_reduce_dtype": "bf16"}, "BF16_Optimizer"),  # the bandwidth option
], ids=["tp2_pp2", "dp2_zero1", "dp2_zero2", "dp2_bf16_reduce"])
def test_bf16_accumulates_and_reduces_in_fp32(corpus, baseline, tmp_path, world, layout, optimizer):
    """bf16 as Megatron trains it: gradients summed over micro-batches in fp32 and reduced across data-parallel ranks
    in fp32 (bf16 with parallel.grad_reduce_dtype bf16), at every layout within bf16 rounding of the fp32 run (the
    same global batch: DP=2 x 1 sequence = 1 x 2)."""
    r = run_ranks(world, _bf16_run, debug_overrides(corpus, tmp_path, **{"train.steps": 3, "train.precision": "bf16",
                                                                          **layout}))[0]
    assert (r["accum"], r["optimizer"]) == ("torch.float32", optimizer)
    if world == 2:
        assert r["reduced"] == [layout.get("parallel.grad_reduce_dtype", "fp32").replace("fp", "torch.float")
                                .replace("bf16", "torch.bfloat16")], r["reduced"]
    for (loss, norm), ref in zip(r["hist"], baseline):
        assert abs(loss - ref["loss"]) <= 1e-2 * ref["loss"], (loss, ref["loss"])
        assert abs(norm - ref["grad_norm"]) <= 5e-2 * ref["grad_norm"], (norm, ref["grad_norm"])


@pytest.mark.parametrize("save_interval", [1, 0], ids=["saved", "none_saved"])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, save_interval):
    """An absurd learning rate blows the weights up: the run stops naming the step, the last good checkpoint stays,
    and the message names it, or says that none was saved (save_interval 0: only at the end)."""
    args = _args(debug_overrides(corpus, tmp_path, **{"train.steps": 20, "train.lr": 1e30, "train.min_lr": 0.0,
                                                         "train.warmup_steps": 0,
                                                         "checkpoint.save_interval": save_interval}))
    res = subprocess.run([sys.executable, "-m", "tokenformer_mp.train", "--config", "configs/debug.yaml", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-2000:]
    # the spike guard first rolls back to the last checkpoint twice (train.spike_max_rollbacks), where there is one
    m = re.search(r"error: step (\d+): loss .* is not finite; (?:2 rollback\(s\) already \(train.spike_max_rollbacks "
                  r"2\)|no checkpoint to roll back to): stopping. (.*)", res.stderr)
    assert m is not None, res.stderr[-2000:]
    step, ckpts = int(m.group(1)), tmp_path / "checkpoints"
    assert step >= 2
    if save_interval:
        assert read_latest(str(ckpts)) == f"global_step{step - 1}"
        assert m.group(2) == f"The last good checkpoint, {ckpts}/global_step{step - 1} (step {step - 1}), is kept."
    else:
        assert not ckpts.exists() or not any(ckpts.iterdir())
        assert m.group(2) == f"No checkpoint has been saved in {ckpts}: a restart starts from scratch."


def _faulty_run(corpus, run, at: int, fault: str) -> subprocess.Popen:
    """The trainer (its main(), in a process of its own) on the corpus, whose sample `at` fails (tests.runs)."""
    argv = ["--config", "configs/debug.yaml", *_args(debug_overrides(corpus, run, **{"train.steps": 20}))]
    code = (f"import sys; from tests.runs import main_with_faulty_data as m; "
            f"sys.exit(m({argv!r}, {at}, {fault!r}, {str(run / 'blocked')!r}))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _steps_done(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for(cond, proc: subprocess.Popen, what: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.1)
    if not cond():
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what}: not within {seconds} s (exit {proc.returncode})\n{out[-2000:]}\n{err[-3000:]}")


def test_an_error_in_the_input_thread_ends_the_run_naming_it(corpus, tmp_path):
    """Sample 12 (the first of step 4: 4 samples a step) raises in the prefetch thread: after steps 1-3 the run ends
    within seconds, exit 2, one error line naming the step, the data and the cause, instead of waiting forever."""
    run = tmp_path / "run"
    proc = _faulty_run(corpus, run, 12, "raise")
    _wait_for(lambda: _steps_done(run) == 3, proc, "step 3", 300)
    _wait_for(lambda: proc.poll() is not None, proc, "the run's end after step 3", 15)
    out, err = proc.communicate()
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    raised = 1 + (REPO / "tests" / "runs.py").read_text().splitlines().index(
        '                raise IndexError(f"index {i} is out of bounds (injected)")')
    assert errors == [f"error: the input of step 4 could not be read from data.prefixes {corpus['prefix']} (index "
                      f"cache {run}/data_cache): IndexError: index 12 is out of bounds (injected) (at "
                      f"{REPO}/tests/runs.py:{raised})"], err[-3000:]
    assert _steps_done(run) == 3


@pytest.mark.parametrize("at,saved", [(12, 3), (0, None)], ids=["step4", "first_step"])
def test_sigterm_while_waiting_for_input_checkpoints_and_exits_124(corpus, tmp_path, at, saved):
    """A read that never returns (sample `at`: the first of step 4, or of step 1) and then SIGTERM: the run saves
    what it trained (steps 1-3; nothing before step 1) and exits 124 within seconds, as at a step boundary."""
    run = tmp_path / "run"
    proc = _faulty_run(corpus, run, at, "block")
    _wait_for(lambda: (run / "blocked").exists() and _steps_done(run) == (saved or 0), proc, "the stuck read", 300)
    time.sleep(0.5)  # the loop is waiting for the input (a signal a moment earlier would act the same)
    proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: proc.poll() is not None, proc, "exit after SIGTERM", 15)
    out, err = proc.communicate()
    assert proc.returncode == 124, err[-3000:]
    assert read_latest(str(run / "checkpoints")) == (saved and f"global_step{saved}")
    assert (f"signal 15: checkpoint saved at step {saved}, exiting" if saved else
            "signal 15 while waiting for the input of step 1: nothing trained, exiting") in out + err
    assert _steps_done(run) == (saved or 0)


def test_final_norm_is_not_decayed(corpus, tmp_path):
    """After one step, the final LayerNorm is the same with weight decay 0.1 or 0 (same gradients, no decay), while
    the decayed parameter tokens differ; at TP=2 x PP=2 as in one process."""
    from tokenformer_mp.checkpoint import load_tensors

    def one_step(wd, world, extra, name):
        run = tmp_path / name
        _run(world, debug_overrides(corpus, run, **{"train.steps": 3, "train.exit_after_steps": 1,
                                                      "train.weight_decay": wd, **extra}))
        weights = load_tensors(str(run / "checkpoints" / "global_step1"))
        return {n: weights[n] for n in
                ("final_norm.weight", "final_norm.bias", "layers.0.ffn.key_tokens")}

    a, b = one_step(0.1, 1, {}, "a"), one_step(0.0, 1, {}, "b")
    # decay would move the weight by lr * wd * 1 = 1.5e-4; what remains is fp32 rounding of the give-back
    torch.testing.assert_close(a["final_norm.weight"], b["final_norm.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["final_norm.bias"], b["final_norm.bias"], rtol=0, atol=1e-6)
    assert not torch.equal(a["layers.0.ffn.key_tokens"], b["layers.0.ffn.key_tokens"])
    c = one_step(0.1, 4, {"parallel.tp": 2, "parallel.pp": 2}, "c")
    # Adam's first step is lr g / (|g| + eps): an element whose gradient is near eps (on the corpus, one at 3e-8: its
    # step 1.11e-3, not 1.5e-3) carries the layouts' fp32 rounding, 5.4e-6 (the others 1.2e-7); decay moves 1.5e-4
    assert_close_to_scale(c["final_norm.weight"], a["final_norm.weight"], 3e-5)


@pytest.mark.parametrize("world,overrides", [
    (4, {"parallel.tp": 2, "parallel.pp": 2}),  # TP collectives, DeepSpeed's partitioned pipe tensors, tied embedding
    # each rank's own slice sent; bf16 activations, fp32 row statistics and tied-embedding gradient
    (4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True, "train.precision": "bf16"}),
    # ZeRO-2: fp32 gradients reduced per micro-batch, bf16 weights gathered, DP x TP
    (4, {"parallel.tp": 2, "parallel.zero_stage": 2, "train.precision": "bf16"}),
    (4, {"parallel.tp": 2, "parallel.overlap_grad_reduce": True, "parallel.grad_bucket_size": 100_000}),  # buckets
    (2, {"train.precision": "bf16", "parallel.grad_reduce_dtype": "bf16"}),  # BF16_Optimizer, bf16 reduction
    # K and V gathered over CP, positions and document ids sent between stages, gradients reduced over DP x CP
    (4, {"parallel.cp": 2, "parallel.pp": 2, "data.reset_attention_mask": True, "data.reset_position_ids": True}),
], ids=["tp2_pp2", "tp2_pp2_sequence_parallel_bf16", "dp2_tp2_zero2_bf16", "dp2_tp2_overlap_grad_reduce",
        "dp2_bf16_reduce", "cp2_pp2_documents"])
def test_every_rank_moves_the_bytes_counted_analytically(world, overrides):
    """The layouts benchmark: one step's bytes, counted on every rank by wrapping torch.distributed (and DeepSpeed's
    own references to it), equal bench.comm.rank_bytes_per_step exactly, rank by rank."""
    from tokenformer_mp.bench.train import measure
    r = measure("configs/debug.yaml", {"train.steps": 3, "model.vocab_size": 4096, **overrides}, world=world)
    assert r["bytes_match_every_rank"], r
    assert r["tp_bytes_per_step"] == r["tp_bytes_analytic"] > 0 or overrides.get("parallel.tp", 1) == 1
    assert r["cp_bytes_per_step"] == r["cp_bytes_analytic"] > 0 or overrides.get("parallel.cp", 1) == 1
    assert r["bytes_per_step"] > r["tp_bytes_per_step"]
