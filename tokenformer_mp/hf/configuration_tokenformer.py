"""TokenFormer's Hugging Face config (arXiv 2410.23168). Shipped inside every export made by
`tools/convert_checkpoint.py export-hf`; it imports nothing but transformers."""
from transformers import PretrainedConfig


class TokenFormerConfig(PretrainedConfig):
    """qkv/proj/ffn_tokens: parameter tokens of each Pattention kind. *_scale_tokens: tau = sqrt(scale_tokens), the
    token count a layer was first built with (pinned when a model grows); None: the current count.
    arch "transformer": the paper's Transformer baseline instead, linear projections and a GELU MLP of
    ffn_hidden_size units (None: 4 x hidden_size); the Pattention fields then mean nothing."""

    model_type = "tokenformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 qkv_tokens=768, proj_tokens=768, ffn_tokens=3072, qkv_scale_tokens=None, proj_scale_tokens=None,
                 ffn_scale_tokens=None, pattention_norm="l2_norm_gelu", max_position_embeddings=2048, rotary_pct=0.25,
                 rope_theta=10000.0, layer_norm_eps=1e-5, initializer_range=0.02, use_cache=True,
                 tie_word_embeddings=True, arch="tokenformer", ffn_hidden_size=None, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.qkv_tokens, self.proj_tokens, self.ffn_tokens = qkv_tokens, proj_tokens, ffn_tokens
        self.qkv_scale_tokens = qkv_scale_tokens or qkv_tokens
        self.proj_scale_tokens = proj_scale_tokens or proj_tokens
        self.ffn_scale_tokens = ffn_scale_tokens or ffn_tokens
        self.pattention_norm = pattention_norm
        self.arch, self.ffn_hidden_size = arch, ffn_hidden_size or 4 * hidden_size
        self.max_position_embeddings, self.rotary_pct, self.rope_theta = max_position_embeddings, rotary_pct, rope_theta
        self.layer_norm_eps, self.initializer_range, self.use_cache = layer_norm_eps, initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
