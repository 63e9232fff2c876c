"""Pattention against an independent float64 formula, exact expansion, parameter counts."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_to_scale
from tokenformer_mp.config import ModelConfig, load_config
from tokenformer_mp.model import (KVCache, Pattention, TokenFormer, _Rotary, _row_dot, count_params, flops_per_token, cross_entropy,
                                  pattention, rotary_tables)


def reference(x, K, V, norm, n_scale):
    """The paper's formulas written out in float64, straight from the definitions."""
    A = x.double() @ K.double().T
    tau = math.sqrt(n_scale)
    if norm == "l2_norm_gelu":
        W = F.gelu(A / torch.sqrt((A * A).sum(-1, keepdim=True)) * tau)
    elif norm == "gelu_l2_norm":
        G = F.gelu(A)
        W = G / torch.sqrt((G * G).sum(-1, keepdim=True)) * tau
    else:
        E = torch.exp(A)
        W = E / E.sum(-1, keepdim=True) * n_scale
    return W @ V.double()


@pytest.mark.parametrize("rows", [(3, 5), (4, 6)])  # odd and even row counts: both ways of the backward's row dot
@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_pattention_matches_float64_formula(norm, rows):
    torch.manual_seed(0)
    p = Pattention(24, 40, 96, norm=norm)
    x = torch.randn(*rows, 24)
    expected = reference(x, p.key_tokens, p.value_tokens, norm, 96)
    assert_close_to_scale(p(x).double(), expected, 1e-5)
    # gradients: the fused backward against autograd through the float64 formula
    x64 = x.double().requires_grad_()
    K, V = p.key_tokens.detach().double().requires_grad_(), p.value_tokens.detach().double().requires_grad_()
    reference(x64, K, V, norm, 96).square().sum().backward()
    xs = x.clone().requires_grad_()
    p(xs).square().sum().backward()
    assert_close_to_scale(xs.grad.double(), x64.grad, 1e-5)
    assert_close_to_scale(p.key_tokens.grad.double(), K.grad, 1e-5)
    assert_close_to_scale(p.value_tokens.grad.double(), V.grad, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(4, 6), (3, 5)])
def test_row_dot_in_fp32_for_every_input(dtype, rows):
    a, b = torch.randn(*rows, 300).to(dtype), torch.randn(*rows, 300).to(dtype)
    got = _row_dot(a, b, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (*rows, 1)
    exact = (a.double() * b.double()).sum(-1, keepdim=True)
    # fp32: summation order only; bf16: each product rounded once (2^-9 relative), the sum itself in fp32
    bound = (1e-6 if dtype == torch.float32 else 2**-9) * (a.double() * b.double()).abs().sum(-1, keepdim=True)
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_l2_norm_gelu_gradcheck(recompute):
    """Gradients for the input, the key and the value tokens, the GELU kept or recomputed."""
    x, keys, values = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 6), (7, 6), (7, 5)))
    assert torch.autograd.gradcheck(lambda *a: pattention(*a, "l2_norm_gelu", 7 ** 0.5, recompute=recompute),
                                    (x, keys, values))


@pytest.mark.parametrize("fused,dtype", [(False, torch.float32), (False, torch.bfloat16), (True, torch.float32)])
def test_recomputed_gelu_gives_the_same_gradients(fused, dtype):
    """Pattention.recompute keeps the scores only and computes the GELU again in backward, with the forward's own
    kernel on the same inputs: outputs and every gradient bit for bit those of keeping it."""
    got = []
    for recompute in (False, True):
        p = Pattention(32, 24, 80)
        p.reset_parameters(seed=2)
        p.to(dtype)
        p.fused, p.recompute = fused, recompute
        x = torch.randn(3, 11, 32, dtype=dtype, generator=torch.Generator().manual_seed(3)).requires_grad_()
        out = p(x)
        (out.float() * torch.linspace(-1, 1, 24)).sum().backward()
        got.append([out, x.grad, p.key_tokens.grad, p.value_tokens.grad])
    for a, b in zip(*got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sharded", [False, True])  # True: the split kernels around a (here one-shard) reduce
def test_compiled_pattention_kernels_match_float64_formula(sharded):
    torch.manual_seed(0)
    p = Pattention(24, 40, 96)
    p.fused = True
    if sharded:
        p.reduce_over_tokens = lambda t: t * 1.0
    x = torch.randn(21, 24)
    x[0] = 0.0  # an all-zero score row: zero out, no share in the tokens' gradients (the formula gives 0/0)
    x64 = x[1:].double().requires_grad_()
    K, V = p.key_tokens.detach().double().requires_grad_(), p.value_tokens.detach().double().requires_grad_()
    expected = reference(x64, K, V, "l2_norm_gelu", 96)
    expected.square().sum().backward()
    xs = x.clone().requires_grad_()
    out = p(xs)
    out.square().sum().backward()
    assert_close_to_scale(out[1:].double(), expected, 1e-5)
    assert torch.equal(out[0], torch.zeros(40))
    assert_close_to_scale(xs.grad[1:].double(), x64.grad, 1e-5)
    assert_close_to_scale(p.key_tokens.grad.double(), K.grad, 1e-5)
    assert_close_to_scale(p.value_tokens.grad.double(), V.grad, 1e-5)


def test_compiled_pattention_kernels_in_bf16_track_eager():
    torch.manual_seed(0)
    eager = Pattention(64, 48, 96).bfloat16()
    fused = Pattention(64, 48, 96).bfloat16()
    fused.load_state_dict(eager.state_dict())
    fused.fused = True
    x = torch.randn(3, 17, 64, dtype=torch.bfloat16)
    got = []
    for p in (eager, fused):
        xs = x.clone().requires_grad_()
        out = p(xs)
        (out.float() * torch.linspace(-1, 1, 48)).sum().backward()
        got.append([out, xs.grad, p.key_tokens.grad, p.value_tokens.grad])
    for e, f in zip(*got):  # fused keeps fp32 between its steps, eager rounds to bf16 after each: 2^-8 apart
        assert f.dtype == torch.bfloat16
        assert ((f.float() - e.float()).norm() / e.float().norm()).item() < 1e-2


def test_compiled_kernels_are_specialised_to_each_width():
    """Two Pattention widths (a second kind, an uneven TP shard) get a static graph each: under dynamic=None the
    second would be one graph with symbolic sizes (looped reductions). Each graph, as the backend receives it."""
    from tokenformer_mp import kernels
    graphs = []

    def record(gm, example_inputs):
        values = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append([tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in values])  # a size: a SymInt
        return gm.forward

    kernel = kernels._compile(lambda z, tau, eps: kernels._forward_local.__wrapped__(z, tau, eps), backend=record)
    for width in (96, 40, 96, 40):
        kernel(torch.randn(2, 5, width), width ** 0.5, 1e-6)
    assert graphs == [[(2, 5, 96)], [(2, 5, 40)]]
    assert all(type(d) is int for g in graphs for shape in g for d in shape)


def test_a_kernel_that_cannot_compile_runs_eager_with_one_warning(monkeypatch, caplog):
    """No Triton (or no C++ compiler on a CPU): every kernel falls back to its eager code, the same outputs, and the
    run says so once."""
    import torch._inductor.compile_fx
    from tokenformer_mp import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    monkeypatch.setattr(kernels, "_eager", False)
    z, grad = torch.randn(3, 7, 53), torch.randn(3, 7, 53)  # a width no other test compiles
    with caplog.at_level("WARNING", logger="tokenformer_mp.kernels"):
        got = kernels.forward(z, 53 ** 0.5, 1e-6, None, sharded=False)
        got_grad = kernels.backward(grad, z, *got[1:], 53 ** 0.5, 1e-6, None, sharded=False)
    want = kernels._forward_local.__wrapped__(z, 53 ** 0.5, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got_grad, kernels._backward_local.__wrapped__(grad, z, *want[1:], 53 ** 0.5, 1e-6))
    assert kernels._eager
    warned = [r.getMessage() for r in caplog.records if r.name == "tokenformer_mp.kernels"]
    assert len(warned) == 1 and warned[0].startswith("train.fused_pattention: compiling the Pattention kernels failed")
    assert warned[0].endswith("RuntimeError: Cannot find a working triton installation"), warned


def test_zero_score_row_is_zero_not_nan():
    p = Pattention(8, 4, 16)
    out = p(torch.zeros(2, 8))
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.isfinite(p.key_tokens.grad).all()


def test_expand_with_zero_keys_is_exact():
    torch.manual_seed(1)
    p = Pattention(64, 48, 100)
    x = torch.randn(4, 7, 64)
    before = p(x)
    tau = p.tau
    p.expand(300)  # 4x the tokens
    assert p.num_tokens == 400 and p.key_tokens.shape == (400, 64) and p.tau == tau
    assert torch.equal(p.key_tokens[100:], torch.zeros(300, 64))
    # Exact in arithmetic; in fp32 only BLAS's summation order over the longer token axis differs.
    after = p(x)
    assert (after - before).abs().max() <= 1e-6 * before.abs().max()
    p64 = Pattention(64, 48, 100).double()
    x64 = x.double()
    b64 = p64(x64)
    p64.expand(300)
    assert (p64(x64) - b64).abs().max() <= 1e-14 * b64.abs().max()  # float64: equal to the last bits
    p.expand(10, key_init="normal")
    assert not torch.allclose(p(x), before)  # the reference's random growth changes the function


def test_expanded_tokens_train():
    """Zero keys with non-zero values receive gradient (zero keys AND values would be dead forever)."""
    p = Pattention(16, 16, 8)
    p.expand(8)
    p(torch.randn(5, 16)).square().sum().backward()
    assert p.key_tokens.grad[8:].abs().sum() > 0


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_grow_keeps_the_outputs_and_trains_the_new_tokens(norm):
    """Pattention.grow (README, Pattention in your own model): shapes grow, tau stays at the old count, the outputs
    within 1e-6 of their scale; the new keys get gradients at once, the new values after one step (their weights are
    GELU(0) = 0 until the keys move). Softmax, whose exp(0) would take weight from the old tokens, is refused."""
    torch.manual_seed(0)
    p = Pattention(24, 16, 32, norm=norm)
    x = torch.randn(3, 5, 24)
    before, old_keys = p(x).detach(), p.key_tokens
    assert p.grow(96) is p
    assert p.key_tokens.shape == (128, 24) and p.value_tokens.shape == (128, 16) and p.num_tokens == 128
    assert p.tau == math.sqrt(32) and int(p.scale_tokens) == 32 and p.key_tokens is not old_keys
    assert torch.equal(p.key_tokens[:32], old_keys) and torch.equal(p.key_tokens[32:], torch.zeros(96, 24))
    assert p.value_tokens[32:].std().item() == pytest.approx(p.value_std, rel=0.1)
    out = p(x)
    assert_close_to_scale(out, before, 1e-6)
    out.square().sum().backward()
    assert (p.key_tokens.grad[32:].abs().sum(1) > 0).all()
    assert torch.equal(p.value_tokens.grad[32:], torch.zeros(96, 16))
    torch.optim.SGD(p.parameters(), lr=0.1).step()  # a new optimizer: grow made new Parameter objects
    p.zero_grad()
    p(x).square().sum().backward()
    assert (p.value_tokens.grad[32:].abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="not softmax"):
        Pattention(4, 4, 4, norm="softmax").grow(4)


def test_tau_survives_state_dict():
    p = Pattention(8, 8, 16, scale_tokens=4)
    q = Pattention(8, 8, 16)
    q.load_state_dict(p.state_dict())
    assert q.tau == 2.0


@pytest.mark.parametrize("name,params", [
    ("150m", 151.9e6), ("450m", 454.2e6), ("900m", 903.3e6), ("1.5b", 1587.2e6),
    ("124m", 123.6e6), ("354m", 354.2e6), ("757m", 753.8e6), ("1.4b", 1309.7e6)])
def test_parameter_counts_match_the_paper_table(name, params):
    cfg = load_config(f"configs/tokenformer-{name}.yaml")
    assert abs(count_params(cfg.model)["params"] - params) / params < 0.01


@pytest.mark.parametrize("name,params", [("124m", 123.6e6), ("354m", 353.5e6), ("757m", 756.7e6), ("1.4b", 1311.0e6)])
def test_transformer_configs_have_the_paper_sizes(name, params):
    """The Transformer baselines at the sizes the paper names (124M, 354M, 757M; 1.4B is Pythia-1.4B's shape, 1.31B
    counted as the TokenFormer-1.4B's 1.3097B), each within 0.5% of the TokenFormer of its name in parameters."""
    cfg = load_config(f"configs/transformer-{name}.yaml")
    assert cfg.model.arch == "transformer" and cfg.model.ffn_width == 4 * cfg.model.hidden_size
    n = count_params(cfg.model)["params"]
    assert abs(n - params) / params < 1e-3
    assert abs(n / count_params(load_config(f"configs/tokenformer-{name}.yaml").model)["params"] - 1) < 5e-3


@pytest.mark.parametrize("arch", ["tokenformer", "transformer"])
def test_counted_params_equal_the_module(arch):
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_heads=2, qkv_tokens=20, proj_tokens=12, ffn_tokens=50,
                      vocab_size=128, arch=arch, ffn_hidden_size=50 if arch == "transformer" else None)
    model = TokenFormer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["params"]
    per_layer = 4 * 32 * 32 + 2 * 32 * 50 if arch == "transformer" else 2 * 32 * (3 * 20 + 12 + 50)
    assert count_params(cfg)["non_embedding_params"] == 3 * per_layer


def test_transformer_debug_config_has_the_debug_models_size_and_flops():
    """configs/transformer-debug.yaml: configs/debug.yaml's model with Linears, parameter for parameter; so the
    same analytic FLOPs per token (2N for every weight whichever layer holds it)."""
    t, d = load_config("configs/transformer-debug.yaml"), load_config("configs/debug.yaml")
    t.model.vocab_size = d.model.vocab_size = 1024
    assert count_params(t.model) == count_params(d.model) == {"params": 655616, "non_embedding_params": 524288,
                                                              "embedding_params": 131072}
    assert flops_per_token(t.model) == flops_per_token(d.model) == 3 * (2 * 524288 + 2 * 1024 * 128 + 4 * 2 * 128 * 128)
    assert (t.data, t.train) == (d.data, d.train)


def test_info_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "tokenformer_mp.info", "--config", "configs/tokenformer-150m.yaml"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["params"] == 151881216 and info["non_embedding_params"] == 113246208
    # Table 3: 3 x (2N + 2 V d + 4 L d T); MFU's count: attention causal, half its T^2 work (2 L d T)
    assert info["flops_per_token"] == 3 * (2 * 113246208 + 2 * 50304 * 768 + 4 * 12 * 768 * 2048)
    assert info["flops_per_token_causal"] == 3 * (2 * 113246208 + 2 * 50304 * 768 + 2 * 12 * 768 * 2048)
    out = subprocess.run([sys.executable, "-m", "tokenformer_mp.info", "--config", "configs/transformer-124m.yaml"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    n = 12 * (4 * 768**2 + 2 * 768 * 3072)  # Q, K, V, output; the MLP at 4 x 768
    assert (info["arch"], info["ffn_hidden_size"], info["non_embedding_params"]) == ("transformer", 3072, n)
    assert info["flops_per_token"] == 3 * (2 * n + 2 * 50304 * 768 + 4 * 12 * 768 * 1024)


def test_model_loss_is_near_uniform_at_init():
    cfg = ModelConfig(vocab_size=512, seq_length=32)
    model = TokenFormer(cfg)
    tokens = torch.randint(0, 512, (2, 32))
    assert abs(model(tokens, tokens).item() - math.log(512)) < 0.1


def _small_model(seq_length: int = 16) -> TokenFormer:
    torch.manual_seed(0)
    model = TokenFormer(ModelConfig(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=32, proj_tokens=32,
                                    ffn_tokens=64, vocab_size=256, seq_length=seq_length))
    return model.eval()


def test_compiled_blocks_match_eager_through_one_graph():
    """train.compile: six blocks run through one compiled graph per grad mode (a graph per layer would reach
    dynamo's recompile limit of 8 and fall back to eager without a word), with eager's loss and gradients."""
    import copy

    from torch._dynamo.utils import counters

    from tokenformer_mp.parallel.build import apply_compile
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = TokenFormer(ModelConfig(num_layers=6, hidden_size=64, num_heads=4, qkv_tokens=32, proj_tokens=32,
                                    ffn_tokens=64, vocab_size=256, seq_length=16))
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    tokens = torch.randint(0, 256, (2, 16))
    losses = []
    for model in (eager, compiled, compiled):  # the second call meets the state the first one left
        model.zero_grad()
        losses.append(model(tokens, tokens.roll(-1, 1)))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-6, atol=0)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):  # fp32 summation order: ~1e-6
        assert (b.grad - a.grad).abs().max() <= 1e-5 * a.grad.abs().max(), name
    assert counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():  # evaluation: one more graph, for all blocks again
        assert_close_to_scale(compiled(tokens), eager(tokens), 1e-5)
    assert counters["stats"]["unique_graphs"] == 2


@torch.no_grad()
def test_kv_cache_continues_exactly():
    """A prompt read in pieces through the KV cache (a prefix, one token, then several at once) gives the logits of
    one whole forward: rotary positions, causal masking across the cached part and the cache's slots all line up."""
    model = _small_model()
    x = torch.randint(0, 256, (2, 14))
    cache = KVCache(model.cfg)
    pieces = [model(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 14))]
    assert_close_to_scale(torch.cat(pieces, dim=1), model(x), 1e-5)
    assert cache.length == 14
    with pytest.raises(ValueError, match="KV cache holds 16 positions"):
        model(x[:, :3], cache=cache)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_with_kv_cache_equals_without(temperature):
    """The same tokens as re-reading the context every step, also past the model's context (seq 16) where the
    window slides: 5 prompt tokens + 30 new ones, greedy and sampled (top-k, top-p) with the same seed."""
    from tokenformer_mp.inference import generate
    model = _small_model()
    prompt = torch.randint(0, 256, (5,)).tolist()
    runs, logits = [], []
    for use_cache in (True, False):
        seen = []  # each step's next-token logits: at init they are flat, so equal tokens alone would prove little
        hook = model.register_forward_hook(lambda m, args, out: seen.append(out[0, -1]))
        runs.append(list(generate(model, prompt, 30, temperature, top_k=50, top_p=0.9, use_cache=use_cache,
                                  generator=torch.Generator().manual_seed(1))))
        hook.remove()
        logits.append(torch.stack(seen))
    assert runs[0] == runs[1]
    assert_close_to_scale(logits[0], logits[1], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_log_softmax_formula(dtype):
    """Loss and gradient against the float64 definition, including a row whose label is ~500 nats below the top
    logit: its probability underflows fp32, the loss must not become inf."""
    torch.manual_seed(0)
    logits = (torch.randn(4, 6, 300) * 3).to(dtype)
    labels = torch.randint(0, 300, (4, 6))
    logits[0, 0, 7], labels[0, 0] = 500.0, 3
    upstream = torch.rand(4, 6)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, labels)
    (loss * upstream).sum().backward()
    x64 = logits.double().requires_grad_()
    ref = -torch.log_softmax(x64, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * upstream.double()).sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-5)  # fp32 sums of bf16 inputs
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # the gradient is rounded to the logits' dtype
    assert_close_to_scale(x.grad, x64.grad, tol)


def test_cross_entropy_backward_twice_is_an_error():
    x = torch.randn(3, 10, requires_grad=True)
    loss = cross_entropy(x, torch.tensor([1, 2, 3])).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_rotary_matches_neox_formula():
    """q and k rotated together against GPT-NeoX's rotate_half written out (first 2h of each head's channels),
    on the strided [B, H, T, hd] views the model passes; the backward by gradcheck."""
    def neox(x, cos, sin):
        r = 2 * cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        half = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], -1)
        return torch.cat([rot * cos + half * sin, rest], -1)

    q = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()  # [B, H, T, hd]
    k = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    cos, sin = rotary_tables(5, 4, 10000.0, "cpu", torch.float64)
    rq, rk = _Rotary.apply(q, k, cos, sin)
    torch.testing.assert_close(rq, neox(q, cos, sin), rtol=0, atol=1e-12)
    torch.testing.assert_close(rk, neox(k, cos, sin), rtol=0, atol=1e-12)
    assert torch.equal(rq[:, :, 0], q[:, :, 0])  # position 0 turns by angle 0
    assert torch.autograd.gradcheck(lambda a, b: _Rotary.apply(a, b, cos, sin), (q, k))


def test_benchmark_pieces_add_up_to_the_kernel():
    """tools/benchmark.py's breakdown times the model's maths when every piece is on, a plain GELU when none is."""
    from tokenformer_mp.bench.pattention import PIECES, _PiecesOf
    torch.manual_seed(0)
    p = Pattention(16, 12, 40)
    x = torch.randn(6, 16)
    runs = []
    for m in (p, _PiecesOf(p, len(PIECES) - 1), _PiecesOf(p, 0)):
        p.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        out = m(xs)
        out.square().sum().backward()
        runs.append((out.detach(), xs.grad, p.key_tokens.grad.clone(), p.value_tokens.grad.clone()))
    for full, model in zip(runs[1], runs[0]):
        assert_close_to_scale(full, model, 1e-5)
    assert_close_to_scale(runs[2][0], F.gelu(x @ p.key_tokens.detach().T) @ p.value_tokens.detach(), 1e-5)


def test_mfu_against_the_datasheet_and_flagged_above_one():
    """Known GPUs by name (the most specific first: an H100 PCIe is not an SXM), unknown ones None; an MFU above 1
    (a matmul peak that read low) is never printed without saying so; the peak is the best reading, spread reported."""
    from tokenformer_mp.flops import MatmulPeak, datasheet_bf16_peak, format_mfu
    assert datasheet_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_bf16_peak("NVIDIA H200") == 989e12 and datasheet_bf16_peak("NVIDIA B200") == 2250e12
    assert datasheet_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert datasheet_bf16_peak("NVIDIA GeForce RTX 4090") is None and datasheet_bf16_peak("cpu") is None
    assert format_mfu(0.431) == "43.1%" and "read low" in format_mfu(1.12)
    peak = MatmulPeak([78e9, 113e9, 109e9])  # the AMD run whose one low reading printed MFU 1.12
    assert peak.best == 113e9 and peak.summary()["matmul_peak_spread"] == pytest.approx(78 / 113)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_inference_in_low_precision_keeps_its_kv_cache_in_it(tmp_path, dtype):
    """tools/generate.py and tools/evaluate.py --dtype: the weights and the KV cache in that dtype (on a GPU bf16
    by default), the logits within its rounding of fp32's."""
    from tokenformer_mp.checkpoint import write_layout_free
    from tokenformer_mp.config import Config
    from tokenformer_mp.inference import DTYPES, default_dtype, load_model
    model = _small_model()
    write_layout_free(dict(model.named_parameters()), Config(model=model.cfg), str(tmp_path / "ckpt"))
    low, _ = load_model(str(tmp_path / "ckpt"), "cpu", dtype)
    assert {p.dtype for p in low.parameters()} == {DTYPES[dtype]}
    x = torch.randint(0, 256, (2, 14))
    cache = KVCache(low.cfg)
    logits = low(x, cache=cache)
    assert {t.dtype for kv in cache.kv for t in kv} == {DTYPES[dtype]}
    assert_close_to_scale(logits.float(), model(x), 2e-2)
    assert default_dtype("cpu") == "fp32" and default_dtype("cuda") == "bf16"
