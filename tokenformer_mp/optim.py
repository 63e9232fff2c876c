"""Per-row optimizer rules inside one parameter: a learning-rate multiplier (0 freezes) and "no weight decay".

After growth, a Pattention's old and new parameter tokens are rows of the same tensor, so parameter groups cannot
tell them apart, and DeepSpeed's ZeRO cannot take extra groups anyway (it reduces once per group across pipeline
stages: a group that exists on one stage only deadlocks). AdamW is elementwise, so a rule is applied exactly after
the step instead: with b the weights before and a after, AdamW at rate m * lr would have given

    b + m (a - b)                           (decayed rows)
    b + m (a - b) + m * lr * wd * b         (rows exempt from weight decay)

The rules act on the fp32 master rows this rank owns (ZeRO's partition fragments, or the parameter itself under a
plain torch optimizer), between the inner optimizer's step and the copy back to the model's weights: no
communication, and the model's low-precision copy follows. Memory: one fp32 copy of the ruled rows this rank owns,
during the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowRule:
    param: torch.nn.Parameter  # the model's parameter (this rank's shard)
    rows: int  # the rule covers its leading `rows` rows (all of a 1-D parameter: rows = numel)
    lr_mult: float = 1.0
    decay: bool = True

    def flat_range(self) -> tuple[int, int]:
        row = self.param[0].numel() if self.param.dim() > 1 else 1
        return 0, min(self.rows, self.param.shape[0]) * row


class RowRules:
    """Registers the rules as step hooks on the torch optimizer that DeepSpeed drives (or that runs alone)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rules: list[RowRule]):
        self.optimizer = optimizer
        self.rules = [r for r in rules if r.rows > 0 and (r.lr_mult != 1.0 or not r.decay)]
        self._saved: list[tuple[torch.Tensor, torch.Tensor, RowRule, dict]] = []
        for rule in self.rules:  # a rule that finds no optimizer state to act on must not pass silently
            view = self._master_view(rule)
            if view is not None and self._group_of(view) is None:
                raise RuntimeError(f"per-row optimizer rule on a {tuple(rule.param.shape)} parameter: its master "
                                   f"weights are in none of the optimizer's parameter groups")
        if self.rules:
            optimizer.register_step_pre_hook(self._before)
            optimizer.register_step_post_hook(self._after)

    def _master_view(self, rule: RowRule) -> torch.Tensor | None:
        """The fp32 master elements of the rule's rows that this rank owns, as a view (None: owns none)."""
        start, end = rule.flat_range()
        p = rule.param
        if not hasattr(p, "_hp_mapping"):  # no ZeRO / bf16 optimizer: the optimizer steps the parameter itself
            if not any(q is p for g in self.optimizer.param_groups for q in g["params"]):
                raise RuntimeError("per-row optimizer rules: the optimizer steps neither this parameter nor a "
                                   "ZeRO master fragment of it")
            return p.data.view(-1)[start:end]
        frag = p._hp_mapping
        if frag is None:  # this parameter lies outside this rank's ZeRO partition
            return None
        lo = frag.lp_fragment_address.start
        s, e = max(start, lo), min(end, lo + frag.lp_fragment_address.numel)
        return frag.hp_fragment.narrow(0, s - lo, e - s) if e > s else None

    def _group_of(self, view: torch.Tensor) -> dict | None:
        """The param group being stepped that holds this view (ZeRO steps one group at a time)."""
        ptr = view.untyped_storage().data_ptr()
        for g in self.optimizer.param_groups:
            if any(q.untyped_storage().data_ptr() == ptr for q in g["params"]):
                return g
        return None

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        self._saved = []
        for rule in self.rules:
            view = self._master_view(rule)
            group = self._group_of(view) if view is not None else None
            if group is not None:
                self._saved.append((view, view.clone(), rule, group))

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        for view, before, rule, group in self._saved:
            if rule.lr_mult != 1.0:
                view.sub_(before).mul_(rule.lr_mult).add_(before)
            if not rule.decay:
                view.add_(before, alpha=rule.lr_mult * float(group["lr"]) * group.get("weight_decay", 0.0))
        self._saved = []


def zero_leading_rows_grad(param: torch.nn.Parameter, rows: int):
    """Frozen rows get no gradient at all: left out of clipping's norm and of Adam's moments, as requires_grad=False
    would do for a whole parameter. Returns the hook handle."""
    mask = torch.ones(param.shape[0], *([1] * (param.dim() - 1)), dtype=param.dtype, device=param.device)
    mask[:rows] = 0
    return param.register_hook(lambda g: g * mask)
