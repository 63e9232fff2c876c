"""Context parallelism (parallel.cp): the sequence of every micro-batch split over a CP group of N ranks.

Load-balanced for causal attention as Megatron does: the sequence is cut into 2N equal chunks and rank r holds chunks
r and 2N-1-r, so every rank has as many (query, visible key) pairs as any other. Pattentions, layer norms and the loss
work per token and need nothing; rotary uses each token's global position (the inputs carry them, data.batches).

Token-token attention needs every earlier key and value. They are all-gathered over the CP group inside attention
(as Llama 3 trains at long context), and the gathered copies' gradients reduce-scattered back in backward:

  all-gather, forward:       K and V of this rank's T/N tokens -> of all T:  2 x (N-1)/N x T x h_local x bytes
  reduce-scatter, backward:  the same size again (every rank's queries read every rank's keys)

h_local = h / TP, the heads this rank computes. A ring of point-to-point sends (ring attention) moves the same
2 (N-1)/N T h bytes each way but in N-1 steps overlapped with partial attentions, merged by their log-sum-exp. The
all-gather is chosen because it is one collective per layer and direction and needs no partial-attention merging:
each of this rank's two query chunks attends to the keys up to its own end through SDPA's causal kernels (flash
attention on a GPU, no mask tensor), and packed documents' boundaries are one mask over the gathered keys. What it
costs is the gathered K and V, [B, heads, T, hd] each, held for backward, (N-1)/N x 2 T h_local elements per layer
beyond this rank's own, and the attention output held twice (its chunks by SDPA, joined by the projection): at CP=2
tokenformer-150m keeps 0.55 of CP=1's activations per rank instead of 0.5 (bench.memory.predicted_saved_bytes; none
of it with activation checkpointing). The overlap a ring offers matters when N is large and the link slow (across
nodes); here CP is meant within a node.

The loss is each rank's sum over its tokens divided by the CP group's token count (all-reduced), times N: DeepSpeed
averages gradients over the DP x CP group (parallel.groups gives it that group as its data-parallel one), which
makes the mean over whole sequences whatever share of masked tokens each rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..model import Attention, attention_mask
from .tensor_parallel import gather


def chunk_index(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The positions of the sequence that CP rank `rank` holds: chunks rank and 2cp-1-rank of 2cp, [seq_len / cp]."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def gathered_index(seq_len: int, cp: int) -> torch.Tensor:
    """The positions of the all-gathered keys, in the order the gather leaves them (rank 0's chunks, rank 1's, ...)."""
    return torch.cat([chunk_index(seq_len, cp, r) for r in range(cp)])


@lru_cache(maxsize=16)
def _in_order(seq_len: int, cp: int, device: torch.device) -> torch.Tensor:
    """The permutation that puts all-gathered keys (chunk order) back in the sequence's order."""
    return torch.argsort(gathered_index(seq_len, cp)).to(device)


def attend_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Causal attention of CP rank `rank`'s queries [B, heads, T/N, hd] (chunks rank and 2N-1-rank of 2N) to keys
    and values in the sequence's order [B, heads, T, hd]: each chunk to the keys up to its own end, causal aligned to
    the bottom right, which SDPA's causal kernels serve (flash attention on a GPU) with no [T/N, T] mask."""
    c = k.shape[2] // (2 * cp)
    out = [F.scaled_dot_product_attention(chunk, k[:, :, :end], v[:, :, :end], attn_mask=causal_lower_right(c, end))
           for chunk, end in zip(q.split(c, dim=2), ((rank + 1) * c, (2 * cp - rank) * c))]
    # concatenated in SDPA's output layout, [B, T/N, heads, hd], so the caller's transpose back is free
    return torch.cat([o.transpose(1, 2) for o in out], dim=1).transpose(1, 2)


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, group,
                    cp: int, rank: int) -> torch.Tensor:
    """Attention of this rank's queries [B, heads, T/N, hd] to every rank's keys and values: one all-gather of K and
    V stacked (backward: one reduce-scatter of their gradients). Without documents (mask None) attend_chunks on them
    in the sequence's order; with documents one SDPA against them in chunk order under ChunkMask's mask."""
    kv = gather(torch.stack([k, v]), 3, group)  # [2, B, heads, T, hd], rank 0's chunks, rank 1's, ...
    if mask is not None:
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
    kv = kv.index_select(3, _in_order(kv.shape[3], cp, kv.device))
    return attend_chunks(q, kv[0], kv[1], cp, rank)


@dataclass(frozen=True)
class ChunkMask:
    """TokenFormer.mask_for under context parallelism, given document ids [B, T] (whole: every key's document): the
    additive mask [B, 1, T/N, T] of this rank's queries against the gathered keys, causal by global position and
    within each document. None without documents (attend_gathered's causal chunks need none). Equal for equal (cp,
    rank): a pipeline stage's blocks share one mask."""
    cp: int
    rank: int

    def __call__(self, doc_ids: torch.Tensor | None, seq_len: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        if doc_ids is None:
            return None
        T = seq_len * self.cp  # seq_len: this rank's tokens
        q_index, k_index = chunk_index(T, self.cp, self.rank).to(device), gathered_index(T, self.cp).to(device)
        return attention_mask(q_index, k_index, doc_ids[:, q_index], doc_ids[:, k_index], dtype)


def token_weighted(loss_fn, group):
    """A loss over this rank's tokens -> its share of the mean over the CP group's tokens, times CP (see above)."""
    cp = dist.get_world_size(group)

    def loss(logits, labels, loss_mask=None):
        mask = torch.ones(labels.shape, device=labels.device) if loss_mask is None else loss_mask.float()
        mine = mask.sum()
        total = mine.clone()
        dist.all_reduce(total, group=group)
        return loss_fn(logits, labels, mask) * (cp * mine / total.clamp_min(1.0))
    return loss


def cp_bytes_per_step(num_layers: int, hidden: int, tokens_per_micro: int, micro_batches: int, cp: int, tp: int,
                      act_bytes: int = 4, recompute: bool = False) -> int:
    """Analytic bytes of the K/V exchange one rank takes part in per optimizer step, as full-tensor bytes per
    collective (bench.comm's convention). T = tokens of a whole micro-batch (all CP ranks'), h = hidden:
      per layer  forward: all-gather [2, T, h / TP] (K and V stacked); backward: reduce-scatter of the same
                 = 4 T h / TP, and 6 T h / TP with activation checkpointing (the forward's gather again)"""
    if cp == 1:
        return 0
    return num_layers * micro_batches * (3 if recompute else 2) * 2 * tokens_per_micro * hidden // tp * act_bytes


def apply_context_parallel(module: nn.Module, group) -> None:
    """Every Attention inside `module` (a TokenFormer, or a pipeline stage's block) over the whole sequence's keys,
    and every mask_for (TokenFormer, pipeline blocks) this rank's chunks'. The loss: token_weighted, by the caller
    that owns it (build)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    mask_for = ChunkMask(cp, rank)
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.attend = partial(attend_gathered, group=group, cp=cp, rank=rank)
        if hasattr(sub, "mask_for"):
            sub.mask_for = mask_for

