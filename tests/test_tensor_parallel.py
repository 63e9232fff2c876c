"""Tensor-parallel Pattention and TokenFormer equal the unsharded model (gloo, several processes)."""
import warnings

import pytest
import torch

from tests.conftest import assert_close_to_scale
from tokenformer_mp.config import ModelConfig
from tokenformer_mp.parallel.local import run_ranks


def _setup(tp):
    import torch.distributed as dist
    from tokenformer_mp.parallel import groups
    dist.init_process_group("gloo")
    groups.initialize(tp, 1)
    return groups.tp_group()


def _model_step(cfg: ModelConfig, tp: int, seed: int, sequence_parallel: bool = False):
    """Loss, logits (gathered) and full gradients of one forward/backward on a fixed batch."""
    import torch.distributed as dist
    from tokenformer_mp.parallel.build import build_model
    torch.manual_seed(0)
    group = _setup(tp) if tp > 1 else None
    model = build_model(cfg, seed, group, sequence_parallel)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    loss = model(tokens, labels)
    loss.backward()
    logits = model(tokens).detach()
    grads, weights = {}, {}
    for name, p in model.named_parameters():
        grad, w = p.grad, p.detach()
        if getattr(p, "shard_range", None) is not None:  # reassemble the full tensor from every rank's rows
            parts = [torch.empty(0)] * tp
            dist.all_gather_object(parts, (grad, w))
            grad = torch.cat([x[0] for x in parts]); w = torch.cat([x[1] for x in parts])
        grads[name], weights[name] = grad, w
    if tp > 1:
        parts = [None] * tp
        dist.all_gather_object(parts, logits)
        logits = torch.cat(parts, dim=-1)
        dist.destroy_process_group()
    return loss.item(), logits, grads, weights


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=32, proj_tokens=32, ffn_tokens=128,
                seq_length=16, vocab_size=256)
    base.update(kw)
    return ModelConfig(**base)


TRANSFORMER = {"arch": "transformer", "ffn_hidden_size": 192}


@pytest.mark.parametrize("tp,kw,sp", [
    (2, {}, False),
    (4, {"qkv_tokens": 30, "proj_tokens": 33, "ffn_tokens": 127}, False),  # token counts TP does not divide
    (2, {"norm": "gelu_l2_norm"}, False),
    (2, {"norm": "softmax"}, False),
    (2, {}, True),  # sequence parallel
    (4, {"qkv_tokens": 30, "proj_tokens": 33, "ffn_tokens": 127}, True),
    # the Transformer baseline: column/row-parallel Linears; MLP widths TP divides and does not
    (2, TRANSFORMER, False),
    (2, TRANSFORMER, True),
    (4, {**TRANSFORMER, "ffn_hidden_size": 190}, False),
    (4, {**TRANSFORMER, "ffn_hidden_size": 190}, True),
])
def test_tp_equals_single_process(tp, kw, sp):
    cfg = _cfg(**kw)
    ref_loss, ref_logits, ref_grads, ref_w = _model_step(cfg, 1, seed=11)
    loss, logits, grads, w = run_ranks(tp, _model_step, cfg, tp, 11, sp)[0]
    for name in ref_w:  # layout-invariant initialisation: the same global weights, bit for bit
        assert torch.equal(w[name], ref_w[name]), name
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_close_to_scale(logits, ref_logits, 1e-5)
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        # Each gradient within 1e-5 of its own scale; one over 1e4 times smaller than the model's largest is a
        # difference of far larger terms (softmax's second-layer queries and keys at init: 2e-7 against 1e-2) and
        # carries their fp32 rounding: within 1e-7 of the largest gradient (measured: 6e-9 of it).
        if g.abs().max().item() >= 1e-4 * largest:
            assert_close_to_scale(grads[name], g, 1e-5, name)
        else:
            assert (grads[name] - g).abs().max().item() <= 1e-7 * largest, name


def _count_step_bytes(cfg: ModelConfig, tp: int, sequence_parallel: bool):
    import torch.distributed as dist
    from tokenformer_mp.bench.comm import count_collectives
    from tokenformer_mp.parallel.build import build_model
    group = _setup(tp)
    model = build_model(cfg, 3, group, sequence_parallel)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    with count_collectives() as counts:
        model(tokens, tokens).backward()
    with count_collectives() as deprecated, warnings.catch_warnings():  # DeepSpeed still calls the old names
        warnings.simplefilter("ignore", FutureWarning)
        dist.all_gather_into_tensor(torch.empty(2 * 10), torch.ones(10), group=group)
    ranks = tuple(dist.get_process_group_ranks(group))
    dist.destroy_process_group()
    return {op: v for (op, r), v in counts.items() if r == ranks}, dict(deprecated)


@pytest.mark.parametrize("arch", ["tokenformer", "transformer"])
@pytest.mark.parametrize("sp", [False, True])
def test_counted_tp_bytes_equal_the_analytic_count(sp, arch):
    """The benchmark's byte counter (every torch.distributed collective wrapped; DeepSpeed's deprecated names, which
    call their successors inside torch, counted once) against tp_bytes_per_step: 32 tokens, two layers, hidden 64.
    The Transformer's plan moves a third of the TokenFormer's without sequence parallelism (4 b h per layer, not
    12 b h + 10 b): no heads to scatter or gather, no norm to sum."""
    from tokenformer_mp.parallel.tensor_parallel import _ALL_GATHER, _REDUCE_SCATTER, tp_bytes_per_step
    cfg = _cfg(**(TRANSFORMER if arch == "transformer" else {}))
    counts, deprecated = run_ranks(2, _count_step_bytes, cfg, 2, sp)[0]
    assert sum(counts.values()) == tp_bytes_per_step(2, 64, 32, 1, 2, sequence_parallel=sp, arch=arch)
    per_layer = {("transformer", False): 4 * 32 * 64 * 4, ("transformer", True): 10 * 32 * 64 * 4,
                 ("tokenformer", False): (12 * 64 + 10) * 32 * 4, ("tokenformer", True): (18 * 64 + 10) * 32 * 4}
    ends = 2 * 32 * 64 * 4 * (2 if sp else 1) + 3 * 32 * 4  # embedding and head (test's own count, as docstring)
    assert sum(counts.values()) == 2 * per_layer[arch, sp] + ends
    expected_ops = {"all_reduce"} | ({_ALL_GATHER, _REDUCE_SCATTER} if sp or arch == "tokenformer" else set())
    assert expected_ops == set(counts)  # the names this torch has (2.11: *_tensor)
    assert deprecated == {("all_gather_into_tensor", (0, 1)): 2 * 10 * 4}


def test_sequence_parallel_splits_the_activations_between_layers():
    """Checkpointed, a block keeps only its input: sequence parallelism halves exactly that at TP=2. Without
    checkpointing the layer norms' inputs are split too, and each block keeps the halves of its two gathered
    inputs (attention's, the FFN's) instead of the whole: one [b, s, h] less per layer, to the byte."""
    from tokenformer_mp.bench.memory import rank_activation_bytes
    cfg, batch = _cfg(), 2
    kept = {(sp, ckpt): run_ranks(2, rank_activation_bytes, cfg, 2, sp, batch, "blocks" if ckpt else "none")[0]
            for sp in (False, True) for ckpt in (False, True)}
    kept_gathered = run_ranks(2, rank_activation_bytes, cfg, 2, True, batch, "none", True)[0]
    block_inputs = cfg.num_layers * batch * cfg.seq_length * cfg.hidden_size * 4  # fp32 [b, s, h] per layer
    assert kept[False, True] - kept[True, True] == block_inputs // 2
    assert kept_gathered - kept[True, False] == block_inputs
    assert kept_gathered < kept[False, False]


@pytest.mark.parametrize("tp", [1, 2])
def test_recomputing_the_gelu_keeps_no_weights(tp):
    """train.recompute_pattention_gelu: each Pattention keeps its scores but not their GELU, [b, s, n / TP] fp32
    per Pattention less, to the byte (this rank's parameter tokens: 3 x 32 + 32 + 128 per layer, over TP)."""
    from tokenformer_mp.bench.memory import rank_activation_bytes
    cfg, batch = _cfg(), 2
    kept = {r: (run_ranks(tp, rank_activation_bytes, cfg, tp, False, batch, r)[0] if tp > 1
                else rank_activation_bytes(cfg, 1, False, batch, r)) for r in ("none", "gelu")}
    weights = cfg.num_layers * batch * cfg.seq_length * (3 * 32 + 32 + 128) // tp * 4
    assert kept["none"] - kept["gelu"] == weights


def _stage_builds(cfg: ModelConfig, tp: int, pp: int) -> tuple[int, int, list[int]]:
    """On a rank of TP x PP: (blocks built, blocks on this stage, stage boundaries)."""
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from tokenformer_mp.parallel import build
    from tokenformer_mp.parallel.launch import init_distributed, discover
    init_distributed(discover(), torch.device("cpu"), 120)
    from tokenformer_mp.parallel import groups
    groups.initialize(tp, pp)
    built, init = [], build.BlockPipe.__init__

    def counted(self, *args, **kwargs):  # test instrumentation: every block constructed on this rank
        built.append(args[1])
        init(self, *args, **kwargs)
    build.BlockPipe.__init__ = counted
    try:
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dist.get_world_size() // (tp * pp))
        pipe = build.build_pipeline(cfg, 5, groups.tp_group(), topo, False)
    finally:
        build.BlockPipe.__init__ = init
    local = sum(isinstance(m, build.BlockPipe) for m in pipe.modules())
    dist.destroy_process_group()
    return len(built), local, list(pipe.parts)


def test_pipeline_stages_are_balanced_without_building_other_stages_layers():
    """Stages balanced by each layer's unsharded parameter count from the config: a rank builds its own stage's
    blocks only (DeepSpeed's own count built all of them on every rank), and TP ranks with uneven token shards
    (31 / 33 / 127 tokens over TP=2) agree on the boundaries."""
    cfg = _cfg(num_layers=4, qkv_tokens=31, proj_tokens=33, ffn_tokens=127)
    ranks = run_ranks(4, _stage_builds, cfg, 2, 2)
    assert all(built == local and local > 0 for built, local, _ in ranks), ranks
    assert len({tuple(parts) for *_, parts in ranks}) == 1
