"""TokenFormer for Hugging Face transformers (arXiv 2410.23168): every linear projection is a Pattention; or, with
config.arch "transformer", the paper's Transformer baseline (linear projections, a GELU MLP).

Shipped inside every export made by `tools/convert_checkpoint.py export-hf` and loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Self-contained: torch and transformers only.
The same function as tokenformer_mp/model.py (tests/test_hf.py holds the two equal): pre-norm blocks with
non-parametric LayerNorms, Q/K/V/output/FFN Pattentions, GPT-NeoX partial rotary, an affine final LayerNorm and the
output head tied to the embedding.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_tokenformer import TokenFormerConfig

NORM_EPS = 1e-6  # an all-zero score row stays zero instead of 0/0 (tokenformer_mp.model.NORM_EPS)


class Pattention(nn.Module):
    """out = Theta(x @ K^T) @ V with n parameter tokens, K: [n, d_in], V: [n, d_out]; tau = sqrt(scale_tokens)."""

    def __init__(self, d_in: int, d_out: int, num_tokens: int, scale_tokens: int, norm: str):
        super().__init__()
        self.key_tokens = nn.Parameter(torch.empty(num_tokens, d_in))
        self.value_tokens = nn.Parameter(torch.empty(num_tokens, d_out))
        self.tau, self.norm = math.sqrt(scale_tokens), norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.key_tokens.t()  # [..., n]
        stat = torch.promote_types(scores.dtype, torch.float32)  # row statistics in fp32 under bf16
        if self.norm == "l2_norm_gelu":  # gelu(tau * A / ||A||_2), the paper's eq. 4
            norm = torch.linalg.vector_norm(scores, dim=-1, keepdim=True, dtype=stat)
            weights = F.gelu(scores * (self.tau / norm.clamp_min(NORM_EPS)).to(scores.dtype))
        elif self.norm == "gelu_l2_norm":  # tau * gelu(A) / ||gelu(A)||_2
            g = F.gelu(scores)
            norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True, dtype=stat)
            weights = g * (self.tau / norm.clamp_min(NORM_EPS)).to(g.dtype)
        elif self.norm == "softmax":  # n * softmax(A), n = tau^2
            e = (scores - scores.amax(-1, keepdim=True)).exp()
            weights = e * (self.tau**2 / e.sum(-1, keepdim=True, dtype=stat)).to(e.dtype)
        else:
            raise ValueError(f"unknown Pattention norm {self.norm!r}: l2_norm_gelu, gelu_l2_norm or softmax")
        return weights @ self.value_tokens


class Linear(nn.Module):
    """A projection without bias, its weight as the project stores it: [out, in] with y = x W^T, or `input_major`
    [in, out] with y = x W (attention's output and the MLP's second Linear, split by their inputs when trained)."""

    def __init__(self, d_in: int, d_out: int, input_major: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty((d_in, d_out) if input_major else (d_out, d_in)))
        self.input_major = input_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight if self.input_major else F.linear(x, self.weight)


class MLP(nn.Module):
    """The Transformer's FFN: Linear -> GELU -> Linear."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up, self.down = Linear(hidden, width), Linear(width, hidden, input_major=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX partial rotary: channels [0, h) and [h, 2h) of each head turn by the position angle, the rest pass.
    x: [B, H, T, hd], cos/sin: [B, 1, T, h]."""
    h = cos.shape[-1]
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: TokenFormerConfig, layer_idx: int):
        super().__init__()
        h, c = config.hidden_size, config
        self.layer_idx, self.head_dim = layer_idx, h // c.num_attention_heads
        if c.arch == "transformer":
            self.query, self.key, self.value = (Linear(h, h) for _ in range(3))
            self.proj = Linear(h, h, input_major=True)
        else:
            self.query, self.key, self.value = (
                Pattention(h, h, c.qkv_tokens, c.qkv_scale_tokens, c.pattention_norm) for _ in range(3))
            self.proj = Pattention(h, h, c.proj_tokens, c.proj_scale_tokens, c.pattention_norm)

    def forward(self, x, rotary, mask, cache: Cache | None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.query, self.key, self.value))
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, heads, past + T, hd]
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(GradientCheckpointingLayer):
    """Pre-norm block; its LayerNorms have no weight or bias. The FFN is one Pattention (its GELU the non-linearity),
    or the Transformer's MLP."""

    def __init__(self, config: TokenFormerConfig, layer_idx: int):
        super().__init__()
        self.eps, self.hidden = config.layer_norm_eps, config.hidden_size
        self.attention = Attention(config, layer_idx)
        if config.arch == "transformer":
            self.ffn = MLP(config.hidden_size, config.ffn_hidden_size)
        else:
            self.ffn = Pattention(config.hidden_size, config.hidden_size, config.ffn_tokens, config.ffn_scale_tokens,
                                  config.pattention_norm)

    def forward(self, x, rotary, mask, cache):
        x = x + self.attention(F.layer_norm(x, (self.hidden,), eps=self.eps), rotary, mask, cache)
        return x + self.ffn(F.layer_norm(x, (self.hidden,), eps=self.eps))


class TokenFormerPreTrainedModel(PreTrainedModel):
    config_class = TokenFormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """The reference's init: keys and embedding N(0, initializer_range), values N(0, 2 / layers / sqrt(h)); the
        Transformer's output Linears as values, its others as keys."""
        c = self.config
        out_std = 2.0 / c.num_hidden_layers / math.sqrt(c.hidden_size)
        if isinstance(module, Pattention):
            module.key_tokens.normal_(0.0, c.initializer_range)
            module.value_tokens.normal_(0.0, out_std)
        elif isinstance(module, Linear):
            module.weight.normal_(0.0, out_std if module.input_major else c.initializer_range)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, c.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class TokenFormerModel(TokenFormerPreTrainedModel):
    def __init__(self, config: TokenFormerConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_dim = int(config.hidden_size // config.num_attention_heads * config.rotary_pct)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos and sin of each position's angles: [B, 1, T, rotary_dim / 2] each; None without rotary channels."""
        if not self.rotary_dim:
            return None
        d = self.rotary_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, d, 2, device=position_ids.device, dtype=torch.float32) / d))
        angles = position_ids.float()[:, None, :, None] * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _mask(attention_mask, B: int, T: int, past: int, device):
        """None (plain causal attention) or a boolean [B, 1, T, past + T]: causal, padding hidden. A padding row
        sees at least itself, so no row is empty (SDPA would return NaN for it)."""
        if attention_mask is None or bool(attention_mask.all()):
            if past == 0 or T == 1:
                return None
            attention_mask = None
        S = past + T
        q = torch.arange(past, S, device=device)[:, None]
        allowed = torch.arange(S, device=device)[None, :] <= q  # [T, S]
        allowed = allowed.expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -S:].bool()
        return allowed | (torch.arange(S, device=device)[None, :] == q)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, h]
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        rotary, mask = self._rotary(position_ids, x.dtype), self._mask(attention_mask, B, T, past, x.device)
        for block in self.layers:
            x = block(x, rotary, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.final_norm(x),
                                       past_key_values=past_key_values if use_cache else None)


class TokenFormerForCausalLM(TokenFormerPreTrainedModel, GenerationMixin):
    """The language model; the output head is the embedding matrix itself (tied), so it has no weights of its own."""

    def __init__(self, config: TokenFormerConfig):
        super().__init__(config)
        self.model = TokenFormerModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, **kwargs):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        h = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        logits = F.linear(h, self.model.embed.weight)  # [B, T, V]
        loss = None
        if labels is not None:  # labels are the inputs; position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
