"""How a TokenFormer is sharded over a tensor-parallel group: the one place that decides it.

Every Pattention keeps a contiguous slice of its parameter tokens (the n axis; uneven when TP does not divide n, so
no padding token exists). A rank computes its scores x @ K_r^T locally; the L2 norm over all n tokens comes from one
all-reduce of per-row sums of squares (one float per row); the partial outputs Theta_r @ V_r are summed.

Per block (forward):
  attention input   copy (backward: all-reduce)           Q, K, V read one replicated input
  query/key/value   reduce-scatter of [T, h] to local heads  token-token attention runs on h/TP heads
  proj              all-gather [T, h/TP] -> [T, h] (backward: reduce-scatter), output all-reduce [T, h]
  ffn               copy in, all-reduce [T, h] out
  + per Pattention one all-reduce of [T] floats (the norm), the same again in backward.
The embedding is vocabulary-parallel (rows sliced) with megatron's vocab-parallel cross entropy.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from ..model import Attention, Block, Embedding, Pattention, TokenFormer, lm_loss


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous, as even as possible: the first n % world ranks take one extra token."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# --- collectives, each a small autograd function with its backward twin -------------------------------------------
# megatron-core has AG/RS over the last dim too, but allocates with torch.cuda.current_device(): these run anywhere.

def _all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)  # flat: gloo wants dim 0 = world * input
    dist.all_gather_single(out, x.contiguous().view(-1), group=group)
    return torch.cat(out.view((world,) + tuple(x.shape)).unbind(0), dim=-1)


def _reduce_scatter_last(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    chunks = torch.stack(x.chunk(world, dim=-1), dim=0)  # [world, ..., d/world]
    out = torch.empty(chunks[0].numel(), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, chunks.view(-1), group=group)
    return out.view(chunks.shape[1:])


class _GatherLastDim(torch.autograd.Function):
    """Forward all-gather along the last dim; backward reduce-scatter (each rank's consumer differs)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_last(g, ctx.group), None


class _ReduceScatterLastDim(torch.autograd.Function):
    """Forward reduce-scatter along the last dim; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_last(g, ctx.group), None


def gather_last_dim(x, group):
    return _GatherLastDim.apply(x, group)


def reduce_scatter_last_dim(x, group):
    return _ReduceScatterLastDim.apply(x, group)


def sum_over_shards(t: torch.Tensor, group) -> torch.Tensor:
    """All-reduce a per-row statistic; its gradient is all-reduced too (every shard's scores depend on the sum):
    megatron's copy region (backward all-reduce) feeding its reduce region (forward all-reduce)."""
    return reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(t, group=group), group=group)


def max_over_shards(t: torch.Tensor, group) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


# --- the plan -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenSharded:
    """A Pattention whose parameter tokens are split across the group. input/output name the collectives."""
    input: str = "none"  # none | copy | gather_heads
    output: str = "reduce"  # reduce | scatter_heads


BLOCK_PLAN = {
    "attention.query": TokenSharded(output="scatter_heads"),
    "attention.key": TokenSharded(output="scatter_heads"),
    "attention.value": TokenSharded(output="scatter_heads"),
    "attention.proj": TokenSharded(input="gather_heads", output="reduce"),
    "ffn": TokenSharded(input="copy", output="reduce"),
}


def _regions(group):
    return {
        "none": lambda x: x,
        "copy": partial(copy_to_tensor_model_parallel_region, group=group),
        "reduce": partial(reduce_from_tensor_model_parallel_region, group=group),
        "gather_heads": partial(gather_last_dim, group=group),
        "scatter_heads": partial(reduce_scatter_last_dim, group=group),
    }


def _shard_rows(p: nn.Parameter, start: int, end: int) -> nn.Parameter:
    """A parameter holding rows [start, end) of a [n, d] tensor, tagged for DeepSpeed and for init/checkpoints."""
    full_shape = tuple(p.shape)
    new = nn.Parameter(torch.empty((end - start,) + full_shape[1:], dtype=p.dtype, device=p.device))
    new.full_shape, new.shard_range, new.partition_dim = full_shape, (start, end), 0
    new.tensor_model_parallel = True  # DeepSpeed's global grad norm counts it on every TP rank
    return new


def shard_pattention(p: Pattention, style: TokenSharded, group) -> None:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start, end = shard_range(p.num_tokens, world, rank)
    p.key_tokens = _shard_rows(p.key_tokens, start, end)
    p.value_tokens = _shard_rows(p.value_tokens, start, end)
    regions = _regions(group)
    p.enter, p.exit = regions[style.input], regions[style.output]
    p.reduce_over_tokens = partial(sum_over_shards, group=group)
    p.max_over_tokens = partial(max_over_shards, group=group)


def shard_block(block: Block, group) -> None:
    modules = dict(block.named_modules())
    for name, style in BLOCK_PLAN.items():
        shard_pattention(modules[name], style, group)
    block.attention.enter = _regions(group)["copy"]  # once for Q, K and V: one backward all-reduce, not three


def shard_embedding(embed: Embedding, group) -> None:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    vocab = embed.weight.shape[0]
    assert vocab % world == 0, f"vocabulary {vocab} not divisible by tp={world}"  # validate() reports it first
    start, end = shard_range(vocab, world, rank)
    embed.weight = _shard_rows(embed.weight, start, end)
    embed.vocab_start = start
    regions = _regions(group)
    embed.enter, embed.exit = regions["copy"], regions["reduce"]


def vocab_parallel_lm_loss(logits, labels, loss_mask=None):
    """lm_loss over vocabulary-sliced logits [B, T, V/TP], without gathering them."""
    return lm_loss(logits, labels, loss_mask, lambda lg, lb: vocab_parallel_cross_entropy(lg.float(), lb))


def apply_tensor_parallel(module: nn.Module, group) -> None:
    """Shard every Block and Embedding inside `module` (a TokenFormer, or one pipeline stage's layer)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for sub in list(module.modules()):
        if isinstance(sub, Block):
            shard_block(sub, group)
        elif isinstance(sub, Embedding):
            shard_embedding(sub, group)
        elif isinstance(sub, TokenFormer):
            sub.loss_fn = vocab_parallel_lm_loss


def tp_bytes_per_step(num_layers: int, hidden: int, tokens_per_micro: int, micro_batches: int, tp: int,
                      elem_bytes: int = 4) -> int:
    """Analytic tensor-parallel traffic of one optimizer step, summed over all pipeline stages of one TP group, as
    full-tensor bytes per collective (the README's table). b = tokens per micro-batch, h = hidden:
      per layer  forward: 3 reduce-scatter [b,h] (Q,K,V) + all-gather [b,h] + 2 all-reduce [b,h] + 5 all-reduce [b]
                 backward: 2 all-reduce [b,h] (copies) + 3 all-gather [b,h] + reduce-scatter [b,h] + 5 all-reduce [b]
                 = 12 b h + 10 b
      embedding and head: all-reduce [b,h] forward, all-reduce [b,h] backward, 3 all-reduce [b] (vocab-parallel CE)
    """
    if tp == 1:
        return 0
    b, h = tokens_per_micro, hidden
    per_micro = num_layers * (12 * b * h + 10 * b) + 2 * b * h + 3 * b
    return per_micro * micro_batches * elem_bytes


__all__ = ["apply_tensor_parallel", "shard_range", "gather_last_dim", "reduce_scatter_last_dim", "sum_over_shards",
           "vocab_parallel_lm_loss", "Attention"]
