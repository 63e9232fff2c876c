"""Per-row optimizer rules (tokenformer_mp.optim) against torch's AdamW with real parameter groups."""
import pytest
import torch

from tests.conftest import assert_close_to_scale
from tokenformer_mp.optim import RowRule, RowRules, zero_leading_rows_grad


def _grads(steps, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("mult", [0.0, 0.3, 2.0])
def test_lr_multiplier_on_leading_rows_equals_a_separate_group(mult):
    """Rows [0, 6) of one tensor at mult * lr equal those rows held as their own parameter in their own group,
    for several steps with a changing lr, weight decay included."""
    torch.manual_seed(0)
    w0 = torch.randn(10, 4)
    ours = torch.nn.Parameter(w0.clone())
    old, new = torch.nn.Parameter(w0[:6].clone()), torch.nn.Parameter(w0[6:].clone())
    opt = torch.optim.AdamW([ours], lr=1e-2, weight_decay=0.1)
    RowRules(opt, [RowRule(ours, 6, lr_mult=mult)])
    ref = torch.optim.AdamW([{"params": [old], "lr": 1e-2 * mult}, {"params": [new]}], lr=1e-2, weight_decay=0.1)
    for i, g in enumerate(_grads(5, (10, 4))):
        for o in (opt, ref):
            o.param_groups[-1]["lr"] = 1e-2 / (i + 1)
        ref.param_groups[0]["lr"] = mult * 1e-2 / (i + 1)
        ours.grad, old.grad, new.grad = g.clone(), g[:6].clone(), g[6:].clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.data[6:], new.data, rtol=0, atol=0)
    assert_close_to_scale(ours.data[:6], old.data, 1e-6)
    if mult == 0.0:
        assert torch.equal(ours.data[:6], w0[:6])  # frozen: bit for bit


def test_no_decay_rule_equals_a_group_without_weight_decay():
    torch.manual_seed(0)
    w0 = torch.randn(7) + 1.0
    ours, ref_p = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ours], lr=1e-2, weight_decay=0.1)
    RowRules(opt, [RowRule(ours, 7, decay=False)])
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.0)
    for g in _grads(5, (7,)):
        ours.grad, ref_p.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert_close_to_scale(ours.data, ref_p.data, 1e-6)
    assert not torch.allclose(ours.data, w0)


def test_frozen_rows_get_no_gradient():
    p = torch.nn.Parameter(torch.randn(5, 3))
    zero_leading_rows_grad(p, 2)
    (p * torch.arange(1.0, 6.0)[:, None]).sum().backward()
    assert torch.equal(p.grad[:2], torch.zeros(2, 3))
    assert torch.equal(p.grad[2:], torch.tensor([3.0, 4.0, 5.0])[:, None].expand(3, 3))


def test_a_rule_the_optimizer_cannot_see_is_an_error():
    stepped, other = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="neither this parameter"):
        RowRules(torch.optim.AdamW([stepped]), [RowRule(other, 2, lr_mult=0.0)])


def test_adam_step_lives_where_torch_puts_it():
    """Fused or capturable AdamW reads `step` on the parameter's device (a CPU step fails its first CUDA step); plain
    AdamW keeps it on the CPU. Checked against torch's own load_state_dict policy on a device that is not the CPU."""
    from tokenformer_mp.engine_checkpoint import adam_step_tensor
    p = torch.empty(3, device="meta")
    for group in ({"params": [0], "fused": True}, {"params": [0], "capturable": True}, {"params": [0]}):
        ours = adam_step_tensor(p, group, 7)
        torch_policy = torch.optim.Optimizer._process_value_according_to_param_policy(
            p, torch.tensor(7.0), 0, [group], "step")
        assert (ours.device, ours.dtype) == (torch_policy.device, torch.float32), group


def _state_after_load(overrides: dict) -> list:
    """Every Adam state entry after the trainer loaded checkpoint.load (or its own checkpoints): its key, device and
    dtype, and those torch's own load_state_dict gives the same state; then one more step must run."""
    from tokenformer_mp.config import load_config
    from tokenformer_mp.trainer import Trainer, shutdown
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    trainer.maybe_resume()
    base = trainer.engine.optimizer.optimizer  # the torch AdamW over ZeRO's flat fp32 partitions
    ref = torch.optim.AdamW([p for g in base.param_groups for p in g["params"]], fused=True)
    ref.load_state_dict(base.state_dict())
    got = []
    for p in (q for g in base.param_groups for q in g["params"]):
        for key, value in base.state[p].items():
            want = ref.state[p][key]
            got.append((key, str(value.device), value.dtype, str(want.device), want.dtype, str(p.device)))
    trainer.train_step()
    shutdown()
    return got


@pytest.mark.parametrize("kind", ["resume", "grown"])
def test_optimizer_state_on_its_parameters_device_after_every_kind_of_load(corpus, tmp_path, kind):
    """A resume at the same layout (DeepSpeed's own files) and a layout-free checkpoint (what a resume at another
    layout and every resharded or grown checkpoint load through; grown here, so the new tokens' state starts at zero):
    every Adam state entry where torch's own load_state_dict puts it."""
    from tests.conftest import debug_overrides
    from tests.runs import train
    from tokenformer_mp.parallel.local import run_ranks
    from tokenformer_mp.reshard import ExpandPlan, reshard
    run_ranks(1, train, debug_overrides(corpus, tmp_path / "src", **{"train.steps": 1}))
    ckpt, extra = str(tmp_path / "src" / "checkpoints"), {}
    if kind == "grown":
        reshard(ckpt, str(tmp_path / "grown"), expand=ExpandPlan({"qkv": 160, "proj": 160, "ffn": 640}),
                progress=False)
        ckpt, extra = str(tmp_path / "grown"), {f"model.{k}_{w}": n for k, n in (("qkv", 160), ("proj", 160),
                                                                                  ("ffn", 640)) for w in ("tokens",)}
        extra.update({f"model.{k}_scale_tokens": n for k, n in (("qkv", 128), ("proj", 128), ("ffn", 512))})
    overrides = debug_overrides(corpus, tmp_path / ("src" if kind == "resume" else "dst"),
                                **{"train.steps": 3, "checkpoint.load": ckpt, **extra})
    entries = run_ranks(1, _state_after_load, overrides)[0]
    assert {e[0] for e in entries} == {"step", "exp_avg", "exp_avg_sq"}
    for key, device, dtype, want_device, want_dtype, param_device in entries:
        assert (device, dtype) == (want_device, want_dtype), (key, device, dtype, want_device, want_dtype)
        assert dtype == torch.float32 and device == param_device
