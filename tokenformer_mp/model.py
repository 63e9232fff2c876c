"""TokenFormer (arXiv 2410.23168): a Transformer whose every linear projection is a Pattention; and, with
model.arch transformer, the Transformer it is measured against (the same model with those projections linear).

Plain single-device PyTorch. Nothing here knows about ranks: tokenformer_mp.parallel shards parameter tokens (and
the baseline's weight rows) and sets the few communication hooks (`enter`, `exit`, `reduce_over_tokens`) that
default to the identity.
"""
from __future__ import annotations

import math
import re
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

NORM_EPS = 1e-6  # an all-zero score row stays zero instead of 0/0


def _identity(x):
    return x


# --- Pattention -------------------------------------------------------------------------------------------------

class _L2NormGeluPattention(torch.autograd.Function):
    """gelu(tau * A / ||A||_2) @ V with A = x @ K^T, normalised over the token axis; fused so the scores are scaled
    in place and only (x, K, V, z, scale) and the GELU's output are kept for backward. `fused`: the elementwise work
    in compiled kernels (tokenformer_mp.kernels), which keep the unscaled scores instead. `recompute`: the GELU's
    output ([..., n], what the value matmul's backward reads) is not kept but computed again from z in backward.

    `reduce` sums a per-row statistic over all parameter-token shards (identity when unsharded), in the forward
    (sum of squares) and in the backward (sum of dz * z): one float per row each way.
    """

    @staticmethod
    def forward(ctx, x, keys, values, tau: float, reduce, fused: bool, recompute: bool):
        z = x @ keys.t()  # A: [..., n]
        ctx.tau, ctx.reduce, ctx.fused, ctx.sharded = tau, reduce, fused, reduce is not _identity
        if fused:
            weights, scale, norm = _kernels().forward(z, tau, NORM_EPS, reduce, ctx.sharded)
        else:
            stat = torch.promote_types(z.dtype, torch.float32)  # row statistics in fp32 even under bf16
            norm = reduce(torch.linalg.vector_norm(z, dim=-1, keepdim=True, dtype=stat).square_()).sqrt_()
            scale = tau / norm.clamp_min(NORM_EPS)  # [..., 1]
            weights = F.gelu(z.mul_(scale.to(z.dtype)))
        ctx.save_for_backward(x, keys, values, z, scale, norm, None if recompute else weights)
        return weights @ values  # [..., d_out]

    @staticmethod
    def backward(ctx, grad_out):
        x, keys, values, z, scale, norm, weights = ctx.saved_tensors
        if weights is None:  # the forward's own kernel again, on the same inputs: the same weights
            weights = _kernels().gelu_scaled(z, scale) if ctx.fused else F.gelu(z)
        grad_v = weights.flatten(0, -2).t() @ grad_out.flatten(0, -2) if ctx.needs_input_grad[2] else None
        del weights
        grad_w = grad_out @ values.t()  # dL/d(weights): [..., n]
        if ctx.fused:
            da = _kernels().backward(grad_w, z, scale, norm, ctx.tau, NORM_EPS, ctx.reduce, ctx.sharded)
        else:
            # d z_j / d A_i = s (delta_ij - z_i z_j / tau^2): the norm couples every token of a row.
            dz = torch.ops.aten.gelu_backward(grad_w, z)
            dot = ctx.reduce(_row_dot(dz, z, norm.dtype))
            coef = torch.where(norm > NORM_EPS, dot / ctx.tau**2, torch.zeros_like(dot))
            da = dz.addcmul_(z, coef.to(z.dtype), value=-1.0)  # dL/dA / scale, in place
        # The row scale goes onto the narrow side of each matmul ([.., d_in], not [.., n]): one pass fewer.
        s = scale.to(z.dtype)
        grad_x = (da @ keys).mul_(s) if ctx.needs_input_grad[0] else None
        grad_k = da.flatten(0, -2).t() @ (x * s).flatten(0, -2) if ctx.needs_input_grad[1] else None
        return grad_x, grad_k, grad_v, None, None, None, None


def _kernels():
    """tokenformer_mp.kernels, imported on first use: torch.compile costs start-up time that eager runs need not pay."""
    from . import kernels as k
    return k


def _row_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum(a * b, -1, keepdim=True), summed in `dtype`. [..., n] x [..., n] -> [..., 1]."""
    if a.dtype != dtype:  # bf16: products rounded once, summed in fp32, no fp32 copies of the operands
        return (a * b).sum(-1, keepdim=True, dtype=dtype)
    if a.shape[:-1].numel() % 2:
        return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)
    # Rows in pairs, one batched matmul: [P, 2, n] @ [P, n, 2], keep the diagonal. One pass with no [.., n]
    # temporary; twice as fast as vecdot (a product, then a sum) on a CPU.
    pairs = torch.bmm(a.reshape(-1, 2, a.shape[-1]), b.reshape(-1, 2, b.shape[-1]).transpose(1, 2))
    return pairs.diagonal(dim1=1, dim2=2).reshape(*a.shape[:-1], 1)


def pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, norm: str, tau: float, reduce=_identity,
               reduce_max=_identity, fused: bool = False, recompute: bool = False) -> torch.Tensor:
    """Theta(x @ K^T) @ V. x: [..., d_in], keys: [n, d_in], values: [n, d_out] -> [..., d_out]."""
    if norm == "l2_norm_gelu":  # paper eq. 4 / 16, the default
        return _L2NormGeluPattention.apply(x, keys, values, tau, reduce, fused, recompute)
    return pattention_weights(x, keys, norm, tau, reduce, reduce_max) @ values


def pattention_weights(x: torch.Tensor, keys: torch.Tensor, norm: str, tau: float, reduce=_identity,
                       reduce_max=_identity) -> torch.Tensor:
    """Theta(x @ K^T) for the other normalisations: [..., d_in], [n, d_in] -> [..., n]."""
    scores = x @ keys.t()
    if norm == "gelu_l2_norm":
        g = F.gelu(scores)
        sumsq = reduce(g.float().square().sum(-1, keepdim=True))
        return g * (tau / sumsq.sqrt().clamp_min(NORM_EPS)).to(g.dtype)
    if norm == "softmax":  # times n as in the reference, with max-subtraction for stability
        m = reduce_max(scores.detach().amax(-1, keepdim=True))
        e = (scores - m).exp()
        return e * (tau**2 / reduce(e.float().sum(-1, keepdim=True))).to(e.dtype)
    raise ValueError(f"unknown Pattention norm {norm!r}")


class Pattention(nn.Module):
    """Token-parameter attention: inputs attend to n learnable key/value parameter tokens. Shaped like nn.Linear.

    out = Theta(x @ K_P^T) @ V_P, with K_P: [n, in_features], V_P: [n, out_features].
    """

    def __init__(self, in_features: int, out_features: int, num_tokens: int, norm: str = "l2_norm_gelu",
                 scale_tokens: int | None = None, key_std: float = 0.02, value_std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features, self.num_tokens, self.norm = in_features, out_features, num_tokens, norm
        self.key_std, self.value_std = key_std, value_std
        self.key_tokens = nn.Parameter(torch.empty(num_tokens, in_features))
        self.value_tokens = nn.Parameter(torch.empty(num_tokens, out_features))
        # tau = sqrt(scale_tokens), fixed for the layer's life; an integer buffer so mixed precision cannot round it.
        self.register_buffer("scale_tokens", torch.tensor(scale_tokens or num_tokens, dtype=torch.int64))
        self._scale = scale_tokens or num_tokens
        self._tau = math.sqrt(self._scale)
        # Communication hooks, identity unless tokenformer_mp.parallel shards the token axis.
        self.enter, self.exit, self.reduce_over_tokens, self.max_over_tokens = _identity, _identity, _identity, _identity
        self.fused = False  # compiled elementwise kernels for l2_norm_gelu (train.fused_pattention)
        self.recompute = False  # GELU output recomputed in backward, not kept (train.recompute_pattention_gelu)
        if self.key_tokens.device.type != "meta":
            self.reset_parameters()

    @property
    def tau(self) -> float:
        return self._tau

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = int(self.scale_tokens)
        self._tau = math.sqrt(self._scale)

    def reset_parameters(self, seed: int | None = None) -> None:
        """N(0, std) keys and values from `seed` (None: drawn from torch's global generator)."""
        self.scale_tokens.fill_(self._scale)  # after to_empty() from the meta device too
        seed = _fresh_seed() if seed is None else seed
        init_rows_(self.key_tokens, self.key_std, 2 * seed)
        init_rows_(self.value_tokens, self.value_std, 2 * seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)
        return self.exit(pattention(x, self.key_tokens, self.value_tokens, self.norm, self.tau,
                                    self.reduce_over_tokens, self.max_over_tokens, self.fused, self.recompute))

    @torch.no_grad()
    def expand(self, m: int, key_init: str = "zeros", value_init: str = "normal",
               generator: torch.Generator | None = None) -> None:
        """Append m parameter tokens after the old ones; tau stays. Zero keys keep the function exactly."""
        if getattr(self.key_tokens, "full_shape", None) is not None:
            raise RuntimeError("expand a Pattention before sharding it (the resharding tool does this per tensor)")
        self.key_tokens = nn.Parameter(append_tokens(self.key_tokens.data, m, key_init, self.key_std, generator))
        self.value_tokens = nn.Parameter(append_tokens(self.value_tokens.data, m, value_init, self.value_std, generator))
        self.num_tokens += m

    def grow(self, n_new: int, generator: torch.Generator | None = None) -> Pattention:
        """Append n_new parameter tokens keeping the outputs, as the resharding tool grows a checkpoint: zero keys
        (their scores are 0 and GELU(0) = 0, the L2 norm unchanged), tau held at the old count, values N(0, value_std)
        so that the new keys receive gradients. key_tokens and value_tokens become new nn.Parameter objects: build the
        optimizer again after growing. Returns self."""
        if self.norm == "softmax":  # exp(0) of a zero key is not 0: the new tokens would take weight from the old
            raise ValueError("Pattention.grow keeps the outputs only under l2_norm_gelu and gelu_l2_norm, not softmax")
        self.expand(n_new, "zeros", "normal", generator)
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tokens={self.num_tokens}, norm={self.norm}, tau={self.tau:.3f}"


def append_tokens(t: torch.Tensor, m: int, init: str, std: float, generator: torch.Generator | None = None):
    """[n, d] -> [n + m, d] with the new rows zeros or N(0, std)."""
    if init == "zeros":
        new = torch.zeros(m, t.shape[1], dtype=t.dtype, device=t.device)
    elif init == "normal":
        new = torch.randn(m, t.shape[1], generator=generator, dtype=torch.float32).mul_(std).to(t.device, t.dtype)
    else:
        raise ValueError(f"unknown token init {init!r}: zeros or normal")
    return torch.cat([t, new], dim=0)


ROWS_PER_SEED = 256  # rows [k * 256, (k + 1) * 256) of a tensor come from a generator of their own


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


def init_rows_(p: torch.Tensor, std: float, seed: int) -> None:
    """N(0, std) for the rows of a [rows, d] tensor this rank holds (parallel.tensor_parallel sets full_shape and
    shard_range; unsharded, all of them), block k of ROWS_PER_SEED rows drawn from a generator seeded by (seed, k).
    The same seed gives the same global tensor at every tensor-parallel degree, and a rank draws its own rows and at
    most two part-blocks around them: the cost of initialising falls as 1/TP."""
    rows = (getattr(p, "full_shape", None) or tuple(p.shape))[0]
    start, end = getattr(p, "shard_range", None) or (0, rows)
    if end == start:
        return
    first, last = start // ROWS_PER_SEED, -(-end // ROWS_PER_SEED)
    blocks = []
    for k in range(first, last):
        n = min(ROWS_PER_SEED, rows - k * ROWS_PER_SEED)
        g = torch.Generator().manual_seed((seed * 1_000_003 + k) % 2**63)
        blocks.append(torch.randn((n,) + tuple(p.shape[1:]), generator=g, dtype=torch.float32))
    drawn = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    with torch.no_grad():
        p.copy_(drawn[start - first * ROWS_PER_SEED:end - first * ROWS_PER_SEED].mul_(std))


# --- the language model -----------------------------------------------------------------------------------------

def rotary_tables(seq_len: int, dim: int, base: float, device, dtype):
    """cos and sin of each position's angles: [T, dim / 2] each (the two rotated halves share them)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """GPT-NeoX partial rotary: channels [0, h) and [h, 2h) of each head turn by the position angle (sign -1: back),
    the rest pass. x: [B, H, T, hd], cos/sin: [T, h], or [B, 1, T, h] for positions per sample."""
    h = cos.shape[-1]
    x1, x2 = x[..., :h], x[..., h:2 * h]
    if torch.compiler.is_compiling():  # out= into slices would end the graph; Inductor makes this one kernel anyway
        return torch.cat([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin, x[..., 2 * h:]], dim=-1)
    out = x.clone()
    o1, o2 = out[..., :h], out[..., h:2 * h]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    """Rotary embedding of q and k in one autograd node whose backward is the inverse rotation: five kernels per
    tensor each way, where slicing, negating and concatenating made some twenty (8% of a debug step on a CPU)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_q, cos, sin, -1.0), _rotate(grad_k, cos, sin, -1.0), None, None


def make_pattention(cfg: ModelConfig, kind: str, in_features: int, out_features: int) -> Pattention:
    return Pattention(in_features, out_features, cfg.tokens(kind), cfg.norm, cfg.scale_tokens(kind),
                      key_std=cfg.init_std, value_std=cfg.output_std)


# --- the Transformer baseline's layers (model.arch transformer) ---------------------------------------------------

class Linear(nn.Module):
    """A projection without bias (as Pattention has none). The weight's first axis is the one tensor parallelism
    splits, as for every sharded tensor here (checkpoints read, and init draws, a rank's rows): [out, in] with
    y = x W^T (nn.Linear's layout) for a layer split along its outputs (column-parallel), [in, out] with y = x W
    (`input_major`) for one split along its inputs (row-parallel: attention's output, the MLP's second matmul)."""

    def __init__(self, in_features: int, out_features: int, std: float, input_major: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.std, self.input_major = in_features, out_features, std, input_major
        shape = (in_features, out_features) if input_major else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.enter, self.exit = _identity, _identity  # tokenformer_mp.parallel's collectives around it
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        init_rows_(self.weight, self.std, _fresh_seed() if seed is None else seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)
        return self.exit(x @ self.weight if self.input_major else F.linear(x, self.weight))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, input_major={self.input_major}"


class MLP(nn.Module):
    """The Transformer's FFN: Linear -> GELU -> Linear through model.ffn_width hidden units. [..., h] -> [..., h]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = Linear(cfg.hidden_size, cfg.ffn_width, cfg.init_std)
        self.down = Linear(cfg.ffn_width, cfg.hidden_size, cfg.output_std, input_major=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def make_projection(cfg: ModelConfig, kind: str) -> nn.Module:
    """An attention projection of hidden_size: a Pattention, or for arch transformer the Linear it replaces."""
    h = cfg.hidden_size
    if cfg.arch == "transformer":
        return Linear(h, h, cfg.output_std, input_major=True) if kind == "proj" else Linear(h, h, cfg.init_std)
    return make_pattention(cfg, kind, h, h)


def make_ffn(cfg: ModelConfig) -> nn.Module:
    return MLP(cfg) if cfg.arch == "transformer" else make_pattention(cfg, "ffn", cfg.hidden_size, cfg.hidden_size)


# a Pattention's parameters by name, in checkpoints and optimizer rules
PATTENTION_NAME = re.compile(r"layers\.\d+\.(?:attention\.(query|key|value|proj)|ffn)\.(key_tokens|value_tokens)$")


def pattention_kind(name: str) -> tuple[str, str] | None:
    """'layers.3.attention.key.value_tokens' -> ('qkv', 'value_tokens'); None for other tensors."""
    m = PATTENTION_NAME.match(name)
    if m is None:
        return None
    sub, which = m.groups()
    return ("ffn" if sub is None else "proj" if sub == "proj" else "qkv"), which


# --- token-token attention, and which keys a query sees ---------------------------------------------------------

def attention_mask(q_index: torch.Tensor, k_index: torch.Tensor, q_doc: torch.Tensor | None = None,
                   k_doc: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask [B or 1, 1, Tq, Tk]: 0 where key j is visible to query i, -inf elsewhere. Visible: not later in
    the sequence (q_index [Tq], k_index [Tk]: the tokens' places in it) and, given documents (q_doc [B, Tq],
    k_doc [B, Tk]), in the same one.

    Additive in the activations' dtype, not boolean: SDPA turns a boolean mask into this on every call and keeps
    that copy for backward, a [Tq, Tk] per layer; built once per micro-batch, one is shared by every layer."""
    visible = (k_index[None, :] <= q_index[:, None]).unsqueeze(0)  # [1, Tq, Tk]
    if q_doc is not None:
        visible = visible & (q_doc[:, :, None] == k_doc[:, None, :])  # [B, Tq, Tk]
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    return mask.unsqueeze(1)


def sequence_mask(doc_ids: torch.Tensor | None, seq_len: int, dtype: torch.dtype, device=None):
    """The attention mask of a micro-batch whose every token is here (no context parallelism): None without
    documents (SDPA's own causal kernels, no mask tensor), else causal within each document. `device`: as
    parallel.context_parallel.ChunkMask takes it."""
    if doc_ids is None:
        return None
    index = torch.arange(seq_len, device=doc_ids.device)
    return attention_mask(index, index, doc_ids, doc_ids, dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Causal attention of [B, heads, T, hd] queries, keys and values; `mask` from sequence_mask. SDPA picks the
    kernel: flash (GPU) or its CPU flash kernel when causal without a mask; with a mask (documents), the
    memory-efficient kernel on a GPU, which takes an additive mask; on a CPU its CPU kernel with the mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rotary_dim = int(cfg.head_dim * cfg.rotary_pct)
        self.rotary_base = cfg.rotary_base
        self.max_positions = cfg.seq_length
        self.query = make_projection(cfg, "qkv")
        self.key = make_projection(cfg, "qkv")
        self.value = make_projection(cfg, "qkv")
        self.proj = make_projection(cfg, "proj")
        self.enter = _identity  # one input region for Q, K and V together (see parallel.tensor_parallel)
        self.attend = attend  # parallel.context_parallel: against the keys and values of the whole sequence
        self._tables = None  # rotary cos/sin of positions 0.. (grown as needed), for the last device and dtype

    def _rotary_tables(self, start: int, T: int, x: torch.Tensor):
        """cos and sin of positions [start, start + T), from tables grown as needed."""
        if torch.compiler.is_compiling():
            # Inside the graph (a few hundred sines): a cached table is module state the graph would guard on, and
            # the call that builds it would compile a second graph, which activation recomputation then mixes up.
            cos, sin = rotary_tables(start + T, self.rotary_dim, self.rotary_base, x.device, x.dtype)
            return cos[start:], sin[start:]
        t = self._tables
        if t is None or t[0].shape[0] < start + T or t[0].device != x.device or t[0].dtype != x.dtype:
            t = self._tables = rotary_tables(start + T, self.rotary_dim, self.rotary_base, x.device, x.dtype)
        return t[0][start:start + T], t[1][start:start + T]

    def _rotary_at(self, position_ids: torch.Tensor, x: torch.Tensor):
        """cos and sin of each token's own position: [B, 1, T, rotary_dim / 2] (broadcast over the heads)."""
        cos, sin = self._rotary_tables(0, self.max_positions, x)
        return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                position_ids: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        """position_ids [B, T]: each token's position (None: 0.. in order, after the cached ones); mask: from
        TokenFormer.mask_for, once per micro-batch."""
        x = self.enter(x)  # under sequence parallelism this gathers the sequence: T is the whole sequence after it
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0  # position of the first token of x
        # [B, T, heads * hd] -> [B, heads, T, hd]; under TP "heads" are this rank's heads.
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.query, self.key, self.value))
        if self.rotary_dim:
            tables = self._rotary_tables(start, T, q) if position_ids is None else self._rotary_at(position_ids, q)
            q, k = _Rotary.apply(q, k, *tables)
        if cache is None:
            y = self.attend(q, k, v, mask)
        else:
            k, v = cache.extend(layer, k, v)  # [B, heads, start + T, hd]
            if start and T > 1:  # new tokens see every cached one, and each other causally
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            # a single new token attends to everything before it
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class KVCache:
    """Every layer's rotated keys and values of the tokens seen so far, for generation one token at a time.
    Preallocated to the model's context: [B, heads, seq_length, hd] per layer, filled up to `length`."""

    def __init__(self, cfg: ModelConfig):
        self.capacity, self.length = cfg.seq_length, 0
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.num_layers

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, heads, T, hd] after the cached ones; returns the keys and values of all the tokens."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions (the model's seq_length); {end} asked")
        if self.kv[layer] is None:
            shape = k.shape[:2] + (self.capacity, k.shape[3])
            self.kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        ck, cv = self.kv[layer]
        ck[:, :, self.length:end], cv[:, :, self.length:end] = k, v
        return ck[:, :, :end], cv[:, :, :end]


class Block(nn.Module):
    """Pre-norm block with non-parametric LayerNorms; the FFN is a single Pattention (its GELU is the non-linearity),
    or the Transformer's MLP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.eps, self.hidden, self.arch = layer_idx, cfg.layernorm_eps, cfg.hidden_size, cfg.arch
        self.attention = Attention(cfg)
        self.ffn = make_ffn(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                mask=None) -> torch.Tensor:
        x = x + self.attention(F.layer_norm(x, (self.hidden,), eps=self.eps), cache, self.layer_idx, position_ids, mask)
        return x + self.ffn(F.layer_norm(x, (self.hidden,), eps=self.eps))


class Embedding(nn.Module):
    """Token embedding, tied with the output head. Sharded, a rank holds rows [vocab_start, vocab_start + rows)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.std, self.vocab_size = cfg.init_std, cfg.vocab_size
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))  # [V, h]
        self.vocab_start, self.enter, self.exit = 0, _identity, _identity
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        init_rows_(self.weight, self.std, _fresh_seed() if seed is None else seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, h]
        if self.weight.shape[0] == self.vocab_size:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])  # rows another rank owns contribute zero here
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.exit(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.enter(h), self.weight)  # [B, T, rows]


class FinalNorm(nn.LayerNorm):
    """The only affine LayerNorm (weight and bias), before the tied head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enter = _identity  # sequence parallelism gathers the sequence here, so every TP rank sees all of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.enter(x))


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy that keeps one fp32 [N, V] tensor, the softmax, and turns it into the gradient in
    place. F.cross_entropy keeps the log-probabilities and zero-fills a second [N, V] for the gradient: a third of
    the loss's peak memory in fp32 (docs/benchmarks.md), and a memory pass per micro-batch."""

    @staticmethod
    def forward(ctx, logits, labels):  # [N, V], [N] -> [N]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        # log-sum-exp from the likeliest token, whose probability (>= 1/V) cannot underflow as the label's can
        lse = logits.amax(-1, keepdim=True).float() - probs.amax(-1, keepdim=True).log()
        ctx.save_for_backward(probs, labels)
        ctx.dtype, ctx.done = logits.dtype, False
        return (lse - logits.gather(-1, labels.unsqueeze(-1)).float()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.done:
            raise RuntimeError("cross entropy backward ran twice: its saved softmax became the first gradient")
        ctx.done = True
        probs, labels = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        probs.mul_(g).scatter_add_(-1, labels.unsqueeze(-1), -g)  # softmax - one_hot(label), times the upstream
        return probs.to(ctx.dtype), None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token loss in fp32: [..., V], [...] -> [...]."""
    return _SoftmaxCrossEntropy.apply(logits.flatten(0, -2), labels.flatten()).view(labels.shape)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
            token_losses=cross_entropy) -> torch.Tensor:
    """Mean next-token cross entropy over unmasked positions (fp32)."""
    losses = token_losses(logits, labels)
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.float()
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)


class TokenFormer(nn.Module):
    """The language model of cfg.arch: a TokenFormer, or the Transformer baseline (the same class; only its blocks'
    projections differ)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size is not None, "resolve model.vocab_size from the tokenizer first"
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.activation_checkpointing = False
        self.loss_fn = lm_loss  # parallel.tensor_parallel swaps in the vocab-parallel cross entropy
        self.mask_for = sequence_mask  # parallel.context_parallel: this rank's chunks of the sequence against all

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, V], or the loss given labels. With a cache (generation), tokens continue
        the cached ones: positions from cache.length on. Packed documents: position_ids [B, T] (each token's rotary
        position; None: 0.. in order) and doc_ids [B, T] (data.batches.document_ids; None: every token sees all
        before it)."""
        x = self.embed(tokens)  # [B, T, h]
        mask = self.mask_for(doc_ids, tokens.shape[1], x.dtype, x.device) if cache is None else None
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, None, position_ids, mask, use_reentrant=False)
            else:
                x = block(x, cache, position_ids, mask)
        if cache is not None:
            cache.length += tokens.shape[1]
        logits = self.embed.logits(self.final_norm(x))
        return logits if labels is None else self.loss_fn(logits, labels, loss_mask)

    def init_weights(self, seed: int) -> None:
        init_weights(self, seed)


def init_weights(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Deterministic init: a seed per module from (seed, canonical module name), so a layer gets the same weights
    whether it lives in one process or on a pipeline stage / tensor-parallel rank."""
    for name, sub in module.named_modules():
        full = f"{prefix}{name}"
        if isinstance(sub, (Pattention, Linear, Embedding)):
            sub.reset_parameters(seed * 1_000_003 + zlib.crc32(full.encode()))
        elif isinstance(sub, nn.LayerNorm):
            sub.reset_parameters()


# --- counting (the paper's Table 3) -----------------------------------------------------------------------------

def count_params(cfg: ModelConfig) -> dict[str, int]:
    h = cfg.hidden_size
    if cfg.arch == "transformer":  # Q, K, V, output [h, h] each; the MLP's two [h, ffn_width]
        per_layer = 4 * h * h + 2 * h * cfg.ffn_width
    else:  # a key and a value token of h per parameter token
        per_layer = 2 * h * (3 * cfg.qkv_tokens + cfg.proj_tokens + cfg.ffn_tokens)
    non_embedding = cfg.num_layers * per_layer
    embedding = cfg.vocab_size * h
    return {"params": embedding + non_embedding + 2 * h, "non_embedding_params": non_embedding,
            "embedding_params": embedding}


def flops_per_token(cfg: ModelConfig, seq_length: int | None = None, *, causal: bool = False) -> int:
    """Training FLOPs per token = 3 x forward (Table 3): 2N + 2 n_vocab d_model + 4 n_layer d_token T.

    Table 3 counts attention's QK^T and AV over all T keys, as if not causal; `causal` counts the half a causal
    model computes (2 n_layer d_token T), as Megatron-LM's num_floating_point_operations (seq_len / 2) and NeMo's
    flops_utils do: MFU's numerator. The paper's count stays the scaling laws' compute axis.

    Both architectures: 2N is every weight's multiply-add (a Pattention's keys and values as a Linear's weight), so
    at equal parameters a TokenFormer and a Transformer count the same. Neither counts elementwise work (Pattention's
    norm and GELU over n scores, the MLP's GELU), as Table 3 and Kaplan et al. do not."""
    T = seq_length or cfg.seq_length
    n = count_params(cfg)["non_embedding_params"]
    attention = (2 if causal else 4) * cfg.num_layers * cfg.hidden_size * T
    return 3 * (2 * n + 2 * cfg.vocab_size * cfg.hidden_size + attention)
