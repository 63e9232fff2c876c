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
The Transformer baseline (model.arch transformer) is Megatron's: Q/K/V and the MLP's first Linear column-parallel,
the output projection and the MLP's second Linear row-parallel (TRANSFORMER_BLOCK_PLAN); a copy into attention and
into the MLP, an all-reduce [T, h] out of each. Both plans split rows only (a Linear keeps its split axis first).
The embedding is vocabulary-parallel (rows sliced) with megatron's vocab-parallel cross entropy.
With sequence parallelism the activations between Pattentions are split along the tokens: copies become
all-gathers and all-reduces reduce-scatters (SEQUENCE_PARALLEL below), and a block keeps the slices it gathered
rather than the gathered inputs, gathering them again in backward (KeepGatheredAsSlices).
"""
from __future__ import annotations

import weakref
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

from ..model import Attention, Block, Embedding, FinalNorm, Linear, Pattention, TokenFormer, lm_loss


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous, as even as possible: the first n % world ranks take one extra token."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# --- collectives, each a small autograd function with its backward twin -------------------------------------------
# megatron-core has AG/RS too (over dim 0, its [s, b, h] layout), but allocates with torch.cuda.current_device():
# these run anywhere, over any dim of our [b, s, h] activations.
# torch 2.13 renamed the single-tensor collectives; the old names (deprecated there, warning per call) are all that
# older releases have. Looked up by name at each call, so a wrapper (bench.comm's byte counter) sees them.
_ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)  # flat: gloo wants dim 0 = world * input
    getattr(dist, _ALL_GATHER)(out, x.contiguous().view(-1), group=group)
    if dim == 0:  # the ranks' slices land in order: nothing to move
        return out.view((world * x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat(out.view((world,) + tuple(x.shape)).unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if dim != 0:  # [world, ...] with `dim` divided by world: each rank's part contiguous, as the collective wants
        return _reduce_scatter(torch.stack(x.chunk(world, dim=dim), dim=0), 0, group).squeeze(0)
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    getattr(dist, _REDUCE_SCATTER)(out.view(-1), x.contiguous().view(-1), group=group)
    return out


def _own_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _Gather(torch.autograd.Function):
    """Forward all-gather along `dim`. Backward reduce-scatter (each rank's consumer differs), or this rank's slice
    when every rank's consumer computes the same gradient (`replicated_grad`)."""

    @staticmethod
    def forward(ctx, x, dim: int, group, replicated_grad: bool):
        ctx.dim, ctx.group, ctx.replicated_grad = dim, group, replicated_grad
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        back = _own_slice if ctx.replicated_grad else _reduce_scatter
        return back(g, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward reduce-scatter along `dim`; backward all-gather."""

    @staticmethod
    def forward(ctx, x, dim: int, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group), None, None


def gather(x, dim: int, group, replicated_grad: bool = False):
    return _Gather.apply(x, dim, group, replicated_grad)


def reduce_scatter(x, dim: int, group):
    return _ReduceScatter.apply(x, dim, group)


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
class RowSharded:
    """A layer whose rows are split across the group: a Pattention's parameter tokens, a Linear's first weight axis
    (its outputs, or its inputs when input-major). input/output name the collectives."""
    input: str = "none"  # none | copy | gather_heads
    output: str = "reduce"  # none | reduce | scatter_heads


BLOCK_PLAN = {
    "attention.query": RowSharded(output="scatter_heads"),
    "attention.key": RowSharded(output="scatter_heads"),
    "attention.value": RowSharded(output="scatter_heads"),
    "attention.proj": RowSharded(input="gather_heads", output="reduce"),
    "ffn": RowSharded(input="copy", output="reduce"),
}

# Column-parallel Q/K/V give this rank's heads directly; the row-parallel output projection holds the same heads'
# input rows and sums its partial outputs. The MLP's hidden units are split alike between its two Linears.
TRANSFORMER_BLOCK_PLAN = {
    "attention.query": RowSharded(output="none"),
    "attention.key": RowSharded(output="none"),
    "attention.value": RowSharded(output="none"),
    "attention.proj": RowSharded(output="reduce"),
    "ffn.up": RowSharded(input="copy", output="none"),
    "ffn.down": RowSharded(output="reduce"),
}
PLANS = {"tokenformer": BLOCK_PLAN, "transformer": TRANSFORMER_BLOCK_PLAN}


# Sequence parallelism (Megatron's): the residual stream between Pattentions is split along the tokens (over_tokens),
# so the layer norms and the residual adds work on [b, s / TP, h]. Every copy into the block becomes an all-gather of
# the tokens and every all-reduce out of it a reduce-scatter onto it: the same bytes on the wire (an all-reduce is a
# reduce-scatter plus an all-gather), activations between layers TP times smaller.
SEQUENCE_PARALLEL = {"copy": "gather_seq", "reduce": "scatter_seq"}


def over_tokens(fn, x: torch.Tensor, *args):
    """fn over dim 0 of [b, s, h] seen as one token axis [b * s, h]: a rank's slice of it is contiguous, so the
    gathers and scatters of sequence parallelism move no data (Megatron's [s, b, h] layout does it for the same
    reason). Everything between the Pattentions works token by token, so which tokens a rank holds is free."""
    return fn(x.flatten(0, 1), 0, *args).view(x.shape[0], -1, x.shape[-1])


class _Slice:
    """One gathered input, kept as this rank's slice; gathered again, once for all its users, when backward needs it."""

    def __init__(self, local: torch.Tensor, full: torch.Tensor, group):
        self.local, self.group = local, group
        self.full = weakref.ref(full)  # alive while its storage can match: no reused address is mistaken for it
        self.ptr, self.offset, self.dtype = full.untyped_storage().data_ptr(), full.storage_offset(), full.dtype
        self.gathered = None

    def holds(self, t: torch.Tensor) -> bool:  # t is the gathered input or a view of it
        return self.full() is not None and t.dtype == self.dtype and t.untyped_storage().data_ptr() == self.ptr

    def rebuild(self, size, stride, offset) -> torch.Tensor:
        if self.gathered is None:  # the same layout as the forward's gather: a view maps onto it unchanged
            self.gathered = over_tokens(_all_gather, self.local, self.group)
        return self.gathered.as_strided(size, stride, self.gathered.storage_offset() + offset)


class KeepGatheredAsSlices:
    """Sequence parallelism's memory, completed as Megatron does: the Pattentions of a block save their input for
    backward, which is the gathered [b, s, h]; the block keeps this rank's [b, s / TP, h] slice instead and gathers
    it again when backward first needs it (one more all-gather per gathered input, (TP - 1) / TP of it kept less).

    Saved-tensor hooks around the block's forward swap the gathered tensors (and views of them) for their slices.
    When other hooks already own what is saved (activation checkpointing, CPU offload) the block leaves them be:
    checkpointed, it keeps nothing inside anyway. Hooks marked `observes_saved_tensors` (the activation-memory
    benchmark) are told what is kept instead of being overridden."""

    def __init__(self, block: nn.Module, group):
        self.group, self.slices, self.hooks, self.observer = group, [], None, None
        block.register_forward_pre_hook(self._enter)
        block.register_forward_hook(self._exit, always_call=True)

    def gather(self, x: torch.Tensor) -> torch.Tensor:  # the block's gather_seq region
        full = over_tokens(gather, x, self.group)
        if self.hooks is not None:
            self.slices.append(_Slice(x.detach(), full, self.group))
        return full

    def _enter(self, block, args):
        if torch.compiler.is_compiling():  # train.compile: the compiled graph chooses what it saves, and these
            return  # hooks (storage pointers, hook stacks) would break it into pieces; it keeps the gathered inputs
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # (pack, unpack) of enclosing hooks
        observer = outer is not None and getattr(outer[0], "observes_saved_tensors", False)
        if not torch.is_grad_enabled() or (outer is not None and not observer):
            return
        self.observer = outer[0] if outer is not None else None
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.hooks.__enter__()

    def _exit(self, block, args, out):
        if self.hooks is not None:
            self.hooks.__exit__()
            self.hooks, self.slices, self.observer = None, [], None

    def _pack(self, t: torch.Tensor):
        kept = next((s for s in self.slices if s.holds(t)), None)
        if self.observer is not None:
            self.observer(t if kept is None else kept.local)
        if kept is None:
            return t.detach()  # not a reference to t itself: that could make a cycle through t's grad_fn
        return kept, t.size(), t.stride(), t.storage_offset() - kept.offset

    @staticmethod
    def _unpack(packed):
        return packed[0].rebuild(*packed[1:]) if isinstance(packed, tuple) else packed


def _regions(group):
    return {
        "none": lambda x: x,
        "copy": partial(copy_to_tensor_model_parallel_region, group=group),
        "reduce": partial(reduce_from_tensor_model_parallel_region, group=group),
        "gather_heads": partial(gather, dim=-1, group=group),
        "scatter_heads": partial(reduce_scatter, dim=-1, group=group),
        # sequence parallelism: activations outside the Pattentions are [b, s / TP, h], a slice of the tokens
        "gather_seq": lambda x: over_tokens(gather, x, group),
        "scatter_seq": lambda x: over_tokens(reduce_scatter, x, group),
        "gather_seq_replicated": lambda x: over_tokens(gather, x, group, True),
    }


def _shard_rows(p: nn.Parameter, start: int, end: int) -> nn.Parameter:
    """A parameter holding rows [start, end) of a [n, d] tensor, tagged for DeepSpeed and for init/checkpoints."""
    full_shape = tuple(p.shape)
    new = nn.Parameter(torch.empty((end - start,) + full_shape[1:], dtype=p.dtype, device=p.device))
    new.full_shape, new.shard_range, new.partition_dim = full_shape, (start, end), 0
    new.tensor_model_parallel = True  # DeepSpeed's global grad norm counts it on every TP rank
    return new


def shard_rows(module: nn.Module, world: int, rank: int) -> None:
    """Give every Pattention, Linear and Embedding in `module` the parameters TP rank `rank` of `world` holds (rows
    of the token, weight or vocabulary axis), without communication hooks: what a rank initialises and holds
    (bench.init)."""
    for sub in module.modules():
        if isinstance(sub, Pattention):
            start, end = shard_range(sub.num_tokens, world, rank)
            sub.key_tokens = _shard_rows(sub.key_tokens, start, end)
            sub.value_tokens = _shard_rows(sub.value_tokens, start, end)
        elif isinstance(sub, Linear):
            sub.weight = _shard_rows(sub.weight, *shard_range(sub.weight.shape[0], world, rank))
        elif isinstance(sub, Embedding):
            start, end = shard_range(sub.weight.shape[0], world, rank)
            sub.weight, sub.vocab_start = _shard_rows(sub.weight, start, end), start


def shard_layer(layer: Pattention | Linear, style: RowSharded, group, region) -> None:
    shard_rows(layer, dist.get_world_size(group), dist.get_rank(group))
    layer.enter, layer.exit = region(style.input), region(style.output)
    if isinstance(layer, Pattention):  # its norm is over all n tokens: row statistics summed over the shards
        layer.reduce_over_tokens = partial(sum_over_shards, group=group)
        layer.max_over_tokens = partial(max_over_shards, group=group)


def shard_block(block: Block, group, region) -> None:
    modules = dict(block.named_modules())
    for name, style in PLANS[block.arch].items():
        shard_layer(modules[name], style, group, region)
    block.attention.enter = region("copy")  # once for Q, K and V: one backward collective, not three


def shard_embedding(embed: Embedding, group, region) -> None:
    world = dist.get_world_size(group)
    assert embed.weight.shape[0] % world == 0, "vocabulary not divisible by tp"  # validate() reports it first
    shard_rows(embed, world, dist.get_rank(group))
    # The head's input is always the whole sequence (under sequence parallelism FinalNorm gathers it): a plain copy.
    embed.enter, embed.exit = partial(copy_to_tensor_model_parallel_region, group=group), region("reduce")


def vocab_parallel_lm_loss(logits, labels, loss_mask=None):
    """lm_loss over vocabulary-sliced logits [B, T, V/TP], without gathering them."""
    return lm_loss(logits, labels, loss_mask, lambda lg, lb: vocab_parallel_cross_entropy(lg.float(), lb))


def apply_tensor_parallel(module: nn.Module, group, sequence_parallel: bool = False) -> None:
    """Shard every Block and Embedding inside `module` (a TokenFormer, or one pipeline stage's layer)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    regions, seq = _regions(group), SEQUENCE_PARALLEL if sequence_parallel else {}

    def resolver(table):  # a plan's collective by name, as sequence parallelism (if on) translates it
        return lambda name: table[seq.get(name, name)]

    for sub in list(module.modules()):
        if isinstance(sub, Block):
            table = regions
            if sequence_parallel:
                table = {**regions, "gather_seq": KeepGatheredAsSlices(sub, group).gather}
            shard_block(sub, group, resolver(table))
        elif isinstance(sub, Embedding):
            shard_embedding(sub, group, resolver(regions))
        elif isinstance(sub, FinalNorm) and sequence_parallel:
            # The whole sequence before the affine norm: its weight then sees every position on every rank, so its
            # gradient needs no reduction of its own. The head's copy region (backward all-reduce) makes that
            # gradient the same on all ranks, hence the backward keeps this rank's slice instead of reduce-scattering.
            sub.enter = regions["gather_seq_replicated"]
        elif isinstance(sub, TokenFormer):
            sub.loss_fn = vocab_parallel_lm_loss


def tp_bytes_per_step(num_layers: int, hidden: int, tokens_per_micro: int, micro_batches: int, tp: int,
                      act_bytes: int = 4, sequence_parallel: bool = False, embedding: bool = True,
                      head: bool = True, arch: str = "tokenformer") -> int:
    """Analytic tensor-parallel traffic of one optimizer step, summed over all pipeline stages of one TP group, as
    full-tensor bytes per collective (the README's table). b = tokens per micro-batch, h = hidden:
      per layer  forward: 3 reduce-scatter [b,h] (Q,K,V) + all-gather [b,h] + 2 all-reduce [b,h] + 5 all-reduce [b]
                 backward: 2 all-reduce [b,h] (copies) + 3 all-gather [b,h] + reduce-scatter [b,h] + 5 all-reduce [b]
                 = 12 b h + 10 b
      arch transformer (TRANSFORMER_BLOCK_PLAN), per layer forward 2 all-reduce [b,h], backward 2 all-reduce [b,h]
                 = 4 b h
    embedding and head: all-reduce [b,h] forward, all-reduce [b,h] backward, 3 all-reduce [b] (vocab-parallel CE)
    Sequence parallel, each all-reduce [b,h] of a layer becomes a reduce-scatter one way and an all-gather the other,
    and backward gathers the two block inputs again (KeepGatheredAsSlices; not when activation checkpointing):
      per layer  8 b h forward + 10 b h backward + 10 b = 18 b h + 10 b
                 (transformer: 4 b h forward + 6 b h backward = 10 b h)
      embedding and head: reduce-scatter + all-gather [b,h] (embedding), all-gather [b,h] forward before the final
                 norm, all-reduce [b,h] backward after the head, 3 all-reduce [b] = 4 b h + 3 b
    `embedding` / `head`: whether the count includes those (one pipeline stage's share leaves out what it lacks).
    `act_bytes`: an activation element's size (2 in bf16); the per-row statistics ([b]) are fp32 in any precision.
    """
    if tp == 1:
        return 0
    b, h, stat = tokens_per_micro, hidden, 4
    ends = 2 if sequence_parallel else 1  # [b,h] collectives of the embedding, and of the head with its input
    if arch == "transformer":
        per_micro = num_layers * (10 if sequence_parallel else 4) * b * h * act_bytes
    else:
        per_micro = num_layers * ((18 if sequence_parallel else 12) * b * h * act_bytes + 10 * b * stat)
    per_micro += embedding * ends * b * h * act_bytes + head * (ends * b * h * act_bytes + 3 * b * stat)
    return per_micro * micro_batches


__all__ = ["apply_tensor_parallel", "shard_range", "gather", "reduce_scatter", "sum_over_shards",
           "vocab_parallel_lm_loss", "Attention"]
