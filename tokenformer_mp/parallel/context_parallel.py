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
all-gather is chosen because it is one collective per layer and direction, lets SDPA run one kernel with one mask
(the chunks' causal order, and packed documents' boundaries, are then just the mask), and needs no partial-attention
merging; what it costs is the gathered K and V, [B, heads, T, hd] each, held for backward: at the chunk sizes where
CP pays (T of tens of thousands), that is small beside the activations of T / N tokens through 5 Pattentions. The
overlap a ring offers matters when N is large and the link slow (across nodes); here CP is meant within a node.

The loss is each rank's sum over its tokens divided by the CP group's token count (all-reduced), times N: DeepSpeed
averages gradients over the DP x CP group (parallel.groups gives it that group as its data-parallel one), which
makes the mean over whole sequences whatever share of masked tokens each rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..model import Attention, attention_mask
from .tensor_parallel import gather


def chunk_index(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The positions of the sequence that CP rank `rank` holds: chunks rank and 2cp-1-rank of 2cp, [seq_len / cp]."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def gathered_index(seq_len: int, cp: int) -> torch.Tensor:
    """The positions of the all-gathered keys, in the order the gather leaves them (rank 0's chunks, rank 1's, ...)."""
    return torch.cat([chunk_index(seq_len, cp, r) for r in range(cp)])


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, group) -> torch.Tensor:
    """Attention of this rank's queries [B, heads, T/N, hd] to every rank's keys and values (one all-gather of K and
    V stacked; backward: one reduce-scatter of their gradients). `mask` from ChunkMask: never None, as the gathered
    keys are in chunk order, not the sequence's."""
    kv = gather(torch.stack([k, v]), 3, group)  # [2, B, heads, T, hd]
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)


@dataclass(frozen=True)
class ChunkMask:
    """TokenFormer.mask_for under context parallelism: the additive mask [B or 1, 1, T/N, T] of this rank's queries
    against the gathered keys, causal by global position and, given document ids [B, T] (whole: every key's
    document), within each document. Equal for equal (cp, rank): a pipeline stage's blocks share one mask."""
    cp: int
    rank: int

    def __call__(self, doc_ids: torch.Tensor | None, seq_len: int, dtype: torch.dtype, device) -> torch.Tensor:
        T = seq_len * self.cp  # seq_len: this rank's tokens
        q_index, k_index = chunk_index(T, self.cp, self.rank).to(device), gathered_index(T, self.cp).to(device)
        if doc_ids is None:
            return attention_mask(q_index, k_index, dtype=dtype)
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


def apply_context_parallel(module: nn.Module, group) -> None:
    """Every Attention inside `module` (a TokenFormer, or a pipeline stage's block) over the whole sequence's keys,
    and every mask_for (TokenFormer, pipeline blocks) this rank's chunks'. The loss: token_weighted, by the caller
    that owns it (build)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    mask_for = ChunkMask(dist.get_world_size(group), dist.get_rank(group))
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.attend = partial(attend_gathered, group=group)
        if hasattr(sub, "mask_for"):
            sub.mask_for = mask_for

