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
