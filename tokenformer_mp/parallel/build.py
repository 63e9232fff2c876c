"""Build the model for a layout: a plain TokenFormer when PP == 1, a DeepSpeed PipelineModule of the same layers
when PP > 1. Either way every module is created on the meta device, sharded, then materialised and initialised
from per-name seeds, so no rank ever holds more than its shard and every layout starts from the same weights."""
from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn as nn

from ..config import ModelConfig
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from ..model import Block, Embedding, FinalNorm, TokenFormer, count_params, init_weights, lm_loss, sequence_mask
from .context_parallel import apply_context_parallel, token_weighted
from .tensor_parallel import apply_tensor_parallel, vocab_parallel_lm_loss


def _allocate(module: nn.Module, device="cpu") -> None:
    """Like Module.to_empty, but keeps the shard attributes that tensor_parallel tags parameters with."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta":
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                sub._parameters[name] = new
        for name, b in list(sub._buffers.items()):
            if b is not None and b.device.type == "meta":
                sub._buffers[name] = torch.empty_like(b, device=device)


def materialize(module: nn.Module, tp_group, seed: int, prefix: str = "", sequence_parallel: bool = False) -> nn.Module:
    apply_tensor_parallel(module, tp_group, sequence_parallel)
    _allocate(module)
    init_weights(module, seed, prefix)
    return module


def build_model(cfg: ModelConfig, seed: int, tp_group=None, sequence_parallel: bool = False,
                cp_group=None) -> TokenFormer:
    with torch.device("meta"):
        model = TokenFormer(cfg)
    materialize(model, tp_group, seed, sequence_parallel=sequence_parallel)
    if cp_group is not None:
        apply_context_parallel(model, cp_group)
        model.loss_fn = token_weighted(model.loss_fn, cp_group)
    return model


def apply_compile(model: nn.Module) -> None:
    """torch.compile every Block in place, the plain model's and a pipeline stage's alike (names and state dicts
    unchanged). The blocks share their code, so the graph compiled for the first serves all (parameters are graph
    inputs): one compilation per grad mode whatever the depth, well inside dynamo's recompile limit. Tensor-parallel
    collectives are traced into the graph as functional collectives."""
    for sub in model.modules():
        if isinstance(sub, Block):
            sub.compile()


# --- pipeline stages: the same modules, constructed by DeepSpeed's LayerSpecs -------------------------------------
# Between layers (and stages) flows a hidden state [B, T, h], or, with packed documents or context parallelism, a
# tuple (hidden, position_ids[, doc_ids]) as the batch's inputs carried them (data.batches.collate): DeepSpeed sends
# every tensor of a tuple to the next stage and gradients back for the floating-point ones.

class EmbeddingPipe(Embedding):
    def __init__(self, cfg: ModelConfig, seed: int, tp_group, sequence_parallel: bool):
        with torch.device("meta"):
            super().__init__(cfg)
        materialize(self, tp_group, seed, "embed", sequence_parallel)

    def forward(self, inputs):
        if isinstance(inputs, tuple):  # (tokens, position_ids[, doc_ids])
            return (super().forward(inputs[0]), *inputs[1:])
        return super().forward(inputs)

    @staticmethod
    def param_count(cfg: ModelConfig, *_) -> int:
        return count_params(cfg)["embedding_params"]


class _StageMask:
    """The attention mask of the micro-batch a stage's blocks last saw: the first block builds it, the others (and
    activation recomputation) reuse it, as TokenFormer.forward builds one for all its layers. Keyed on the doc_ids
    tensor itself (the same object through a stage's blocks), so another micro-batch never gets a stale mask."""

    def __init__(self):
        self.key, self.doc, self.mask = None, None, None

    def __call__(self, mask_for, doc_ids, seq_len: int, dtype: torch.dtype, device):
        if torch.compiler.is_compiling():  # inside a compiled block: built in the graph
            return mask_for(doc_ids, seq_len, dtype, device)
        key = (mask_for, seq_len, dtype, doc_ids is None)
        doc = None if doc_ids is None else self.doc and self.doc()
        if key != self.key or doc is not doc_ids:
            self.mask = mask_for(doc_ids, seq_len, dtype, device)
            self.key, self.doc = key, None if doc_ids is None else weakref.ref(doc_ids)
        return self.mask


_stage_mask = _StageMask()  # one process holds one stage


class BlockPipe(Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int, seed: int, tp_group, sequence_parallel: bool, cp_group):
        with torch.device("meta"):
            super().__init__(cfg, layer_idx)
        materialize(self, tp_group, seed, f"layers.{layer_idx}.", sequence_parallel)
        self.mask_for = sequence_mask  # as on TokenFormer; parallel.context_parallel sets this rank's chunks'
        apply_context_parallel(self, cp_group)

    def forward(self, inputs):
        if not isinstance(inputs, tuple):
            return super().forward(inputs)
        x, position_ids, *doc_ids = inputs  # x: [B, T / TP, h] under sequence parallelism; positions [B, T]
        mask = _stage_mask(self.mask_for, doc_ids[0] if doc_ids else None, position_ids.shape[1], x.dtype, x.device)
        return (super().forward(x, None, position_ids, mask), position_ids, *doc_ids)

    @staticmethod
    def param_count(cfg: ModelConfig, *_) -> int:
        return count_params(cfg)["non_embedding_params"] // cfg.num_layers


class FinalNormPipe(FinalNorm):
    def __init__(self, cfg: ModelConfig, tp_group, sequence_parallel: bool):
        super().__init__(cfg.hidden_size, eps=cfg.layernorm_eps)
        apply_tensor_parallel(self, tp_group, sequence_parallel)

    def forward(self, inputs):
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)

    @staticmethod
    def param_count(cfg: ModelConfig, *_) -> int:
        return 2 * cfg.hidden_size


def _head(embed: Embedding, h: torch.Tensor) -> torch.Tensor:
    return embed.logits(h)


def _pipe_loss(loss_fn, logits, labels):
    labels, loss_mask = labels
    return loss_fn(logits, labels, loss_mask)


class TokenFormerPipeline(PipelineModule):
    """DeepSpeed's PipelineModule with its stages balanced by each layer's unsharded parameter count, computed from
    the config. DeepSpeed's own count builds (allocates and initialises) every layer of the model on every rank just
    to count it, and with uneven token shards TP ranks would count, and partition, differently."""

    def _count_layer_params(self) -> list[int]:
        return [spec.typename.param_count(*spec.module_args) for spec in self._layer_specs]


def build_pipeline(cfg: ModelConfig, seed: int, tp_group, topology, activation_checkpointing: bool,
                   sequence_parallel: bool = False, cp_group=None):

    sp = sequence_parallel
    specs = [TiedLayerSpec("embed", EmbeddingPipe, cfg, seed, tp_group, sp, tied_weight_attr="weight")]
    specs += [LayerSpec(BlockPipe, cfg, i, seed, tp_group, sp, cp_group) for i in range(cfg.num_layers)]
    specs += [LayerSpec(FinalNormPipe, cfg, tp_group, sp),
              TiedLayerSpec("embed", EmbeddingPipe, cfg, seed, tp_group, sp, forward_fn=_head,
                            tied_weight_attr="weight")]
    tp = topology.get_dim("model")
    loss_fn = vocab_parallel_lm_loss if tp > 1 else lm_loss
    if cp_group is not None:
        loss_fn = token_weighted(loss_fn, cp_group)
    # no_grad: PipelineModule broadcasts the tied embedding in place, which grad mode would record on the parameter
    # (torch then warns at every backward that c10d::broadcast_ has no autograd kernel)
    with torch.no_grad():
        return TokenFormerPipeline(
            layers=specs, loss_fn=partial(_pipe_loss, loss_fn), topology=topology, partition_method="parameters",
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            activation_checkpoint_func=partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))


def canonical_name(pipe_name: str, num_layers: int) -> str:
    """PipelineModule parameter name -> the plain TokenFormer's name (layout-free checkpoints use these)."""
    if pipe_name.startswith("tied_modules.embed."):
        return "embed." + pipe_name[len("tied_modules.embed."):]
    idx, rest = pipe_name.split(".", 1)
    idx = int(idx)
    if 1 <= idx <= num_layers:
        return f"layers.{idx - 1}.{rest}"
    if idx == num_layers + 1:
        return f"final_norm.{rest}"
    raise KeyError(pipe_name)
