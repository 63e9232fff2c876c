"""Long context: packed documents kept apart (data.reset_attention_mask, reset_position_ids, eod_mask_loss), and
context parallelism (parallel.cp)."""
import importlib.util
import json

import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from tests.conftest import REPO, assert_close_to_scale, debug_overrides
from tests.runs import train
from tests.test_training import _assert_same, baseline  # noqa: F401 (baseline: the one-process run, a fixture)
from tokenformer_mp.checkpoint import load_tensors, write_layout_free
from tokenformer_mp.config import Config, ModelConfig, load_config, pad_vocab
from tokenformer_mp.data.batches import Packing, collate
from tokenformer_mp.data.datasets import build_datasets, cache_dir_of, sample_counts
from tokenformer_mp.data.batches import document_ids
from tokenformer_mp.data.preprocess import preprocess
from tokenformer_mp.data.reader import read_texts
from tokenformer_mp.model import TokenFormer, attend, cross_entropy, sequence_mask
from tokenformer_mp.parallel.build import build_model
from tokenformer_mp.parallel.context_parallel import ChunkMask, attend_gathered, chunk_index, gathered_index
from tokenformer_mp.parallel.local import run_ranks
from tokenformer_mp.tokenizer import build_tokenizer

EOD = 0


def _cfg(**kw):
    base = dict(num_layers=2, hidden_size=64, num_heads=4, qkv_tokens=32, proj_tokens=32, ffn_tokens=128,
                seq_length=32, vocab_size=256)
    return ModelConfig(**{**base, **kw})


def _packed(lengths: list[list[int]], seed: int = 0):
    """A batch of samples packed from documents of the given lengths, each ended by EOD: (tokens [B, T], the
    documents per sample, position ids restarting at each document)."""
    g = torch.Generator().manual_seed(seed)
    tokens, docs, positions = [], [], []
    for row in lengths:
        ds = [torch.cat([torch.randint(1, 256, (n - 1,), generator=g), torch.tensor([EOD])]) for n in row]
        tokens.append(torch.cat(ds))
        docs.append(ds)
        positions.append(torch.cat([torch.arange(n) for n in row]))
    return torch.stack(tokens), docs, torch.stack(positions)


def test_packed_documents_equal_each_document_run_alone():
    """data.reset_attention_mask + reset_position_ids: each document of a packed sample gets the logits (hence the
    per-document losses) it gets alone, within 1e-5 of their scale; documents of different lengths in each sample
    of a batch of two. Without the mask the later documents differ; without the positions reset they do not, since
    rotary angles between two tokens depend only on their distance (the positions matter to unmasked attention)."""
    torch.manual_seed(0)
    model = TokenFormer(_cfg())
    model.init_weights(3)
    tokens, docs, positions = _packed([[9, 14, 9], [5, 20, 7]])
    doc_ids = document_ids(tokens, EOD)
    assert doc_ids[0].tolist() == [0] * 9 + [1] * 14 + [2] * 9
    with torch.no_grad():
        packed = model(tokens, position_ids=positions, doc_ids=doc_ids)
        unmasked = model(tokens, position_ids=positions)
        unreset = model(tokens, doc_ids=doc_ids)
        neither = model(tokens)
    for b, sample in enumerate(docs):
        start = 0
        for i, doc in enumerate(sample):
            end = start + len(doc)
            with torch.no_grad():
                alone = model(doc[None])[0]
            assert_close_to_scale(packed[b, start:end], alone, 1e-5, f"sample {b} document {i}")
            loss_packed = cross_entropy(packed[b, start:end - 1], doc[1:]).mean()
            loss_alone = cross_entropy(alone[:-1], doc[1:]).mean()
            assert abs(loss_packed - loss_alone) <= 1e-5 * loss_alone
            assert_close_to_scale(unreset[b, start:end], alone, 1e-5, f"sample {b} document {i}, not reset")
            if i > 0:  # a document that is not the sample's first sees the ones before it without the mask
                assert (unmasked[b, start:end] - alone).abs().max() > 1e-3
                assert (neither[b, start:end] - unmasked[b, start:end]).abs().max() > 1e-3
            start = end


@pytest.fixture(scope="module")
def paragraphs(corpus, tmp_path_factory) -> dict:
    """The corpus with each paragraph (text between blank lines) a document, tokenized by the corpus's tokenizer:
    3,233 documents of 60 tokens at the median, 6 of them ending inside the first 3 steps' 256-token samples. (None of
    the corpus's own, e-mails of some 2,000 tokens, ends there: the document masks would go untested.)"""
    out = tmp_path_factory.mktemp("paragraphs")
    rows = [{"text": p} for (text,) in read_texts([corpus["text"]]) for p in text.split("\n\n") if p.strip()]
    (out / "paragraphs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess([str(out / "paragraphs.jsonl")], str(out / "paragraphs"), "SentencePieceTokenizer", corpus["tokenizer"],
               progress=False)
    return {"text": str(out / "paragraphs.jsonl"), "prefix": str(out / "paragraphs_text_document"),
            "tokenizer": corpus["tokenizer"]}


def test_eod_loss_mask_and_reset_positions_follow_megatron(paragraphs, tmp_path):
    """The data flags as megatron-core's GPTDataset applies them to real packed samples: eod_mask_loss masks exactly
    the positions whose input is EOD, reset_position_ids restarts at 0 after each EOD; off, neither. The trainer's
    collate carries them with document ids that change exactly where the positions restart, and the attention mask
    built from those is megatron's reset_attention_mask, element for element."""
    tok = build_tokenizer("SentencePieceTokenizer", paragraphs["tokenizer"])
    args = ([paragraphs["prefix"]], None, "98,2,0", 64, 1234, (256, 1, 0), tok)
    plain = build_datasets(*args, str(tmp_path / "a"))[0]
    flagged = build_datasets(*args, str(tmp_path / "b"), reset_position_ids=True, eod_mask_loss=True)[0]
    samples = [flagged[i] for i in range(256)]
    eods = 0
    for i, s in enumerate(samples):
        tokens = torch.as_tensor(s["tokens"])
        assert torch.equal(tokens, torch.as_tensor(plain[i]["tokens"]))  # the same packing
        is_eod = tokens == tok.eod
        eods += int(is_eod.sum())
        assert torch.equal(torch.as_tensor(s["loss_mask"]) == 0, is_eod)
        assert torch.equal(torch.as_tensor(plain[i]["loss_mask"]), torch.ones(64))
        starts = torch.cat([torch.tensor([True]), is_eod[:-1]])  # a document starts after each EOD
        expect = torch.arange(64) - torch.cummax(torch.where(starts, torch.arange(64), 0), 0).values
        assert torch.equal(torch.as_tensor(s["position_ids"]), expect)
        assert torch.equal(torch.as_tensor(plain[i]["position_ids"]), torch.arange(64))
    assert eods >= 50  # paragraphs of some 60 tokens: dozens end inside these samples (77)
    (tokens, positions, doc_ids), labels, mask = collate(samples, Packing(positions=True, eod=tok.eod))
    assert torch.equal(positions[:, 1:] == 0, doc_ids[:, 1:] != doc_ids[:, :-1])
    assert torch.equal(mask == 0, tokens == tok.eod)
    # the attention mask is megatron's reset_attention_mask (its [1, T, T] mask, True where a key is hidden)
    hidden = sequence_mask(doc_ids, 64, torch.float32)[:, 0] == float("-inf")
    for b in range(len(samples)):
        megatron = _get_ltor_masks_and_position_ids(tokens[b], tok.eod, False, True, False, True)[0][0]
        assert torch.equal(hidden[b], megatron)


# --- the trainer: documents kept apart at every layout ---------------------------------------------------------

DOCUMENTS = {"data.reset_attention_mask": True, "data.reset_position_ids": True, "data.eod_mask_loss": True,
             "model.seq_length": 256}  # on paragraphs: documents end inside these samples


@pytest.fixture(scope="module")
def documents_run(paragraphs, tmp_path_factory):
    overrides = debug_overrides(paragraphs, tmp_path_factory.mktemp("docs"), **{"train.steps": 3, **DOCUMENTS})
    return overrides, run_ranks(1, train, overrides)[0]


@pytest.fixture(scope="module")
def documents_baseline(documents_run):
    return documents_run[1]


def test_trainer_loss_is_the_packed_loss(documents_run):
    """The trainer's first loss and grad norm (before any update) equal those computed here from the raw samples,
    each micro-batch's tokens with megatron's reset positions, document ids from its EODs and a loss mask 0 at EOD
    inputs: the config's flags reach the dataset, the input thread and the model."""

    overrides, hist = documents_run
    cfg = load_config("configs/debug.yaml", overrides)
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    cfg.model.vocab_size = pad_vocab(tok.vocab_size, cfg.model.pad_vocab_multiple)
    t, d = cfg.train, cfg.data
    ds = build_datasets(d.prefixes, d.weights, d.split, cfg.model.seq_length, t.seed, sample_counts(cfg, 1), tok,
                        cache_dir_of(cfg), reset_position_ids=True, eod_mask_loss=True)[0]
    model = build_model(cfg.model, t.seed)
    losses, eods = [], 0
    for m in range(2):  # the first step: two micro-batches of two samples, their mean loss
        samples = [ds[i] for i in (2 * m, 2 * m + 1)]
        tokens, labels, positions = (torch.stack([torch.as_tensor(s[k]) for s in samples]).long()
                                     for k in ("tokens", "labels", "position_ids"))
        eods += int((tokens == tok.eod).sum())
        loss = model(tokens, labels, (tokens != tok.eod).float(), position_ids=positions,
                     doc_ids=document_ids(tokens, tok.eod)) / 2
        loss.backward()
        losses.append(loss.item())
    assert eods >= 1
    norm = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    # without the document mask the grad norm moves by 0.2%, the loss by 2.5e-4 of itself
    assert abs(hist[0]["loss"] - sum(losses)) <= 1e-5 * sum(losses), (hist[0]["loss"], sum(losses))
    assert abs(hist[0]["grad_norm"] - norm) <= 1e-5 * norm, (hist[0]["grad_norm"], norm)


DOCUMENT_LAYOUTS = {  # name: (world size, overrides), the baseline's global batch
    "tp2": (2, {"parallel.tp": 2}),
    # positions and documents carried between pipeline stages (DeepSpeed partitioning the activations over TP, and
    # under sequence parallelism not), the mask built once per stage
    "tp2_pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
    "tp2_pp2_sequence_parallel": (4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}),
}


@pytest.mark.parametrize("name", list(DOCUMENT_LAYOUTS))
def test_documents_at_a_layout_equal_one_process(name, paragraphs, documents_baseline, tmp_path):
    world, extra = DOCUMENT_LAYOUTS[name]
    hist = run_ranks(world, train, debug_overrides(paragraphs, tmp_path, **{"train.steps": 3, **DOCUMENTS, **extra}))[0]
    _assert_same(hist, documents_baseline)


# --- context parallelism: the sequence split over parallel.cp ranks ---------------------------------------------

def test_chunks_are_load_balanced():
    """2 CP chunks per rank, r and 2CP-1-r, together the whole sequence; every rank has as many (query, visible key)
    pairs under the causal mask as any other."""
    assert chunk_index(8, 2, 0).tolist() == [0, 1, 6, 7] and chunk_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp in (2, 4):
        parts = [chunk_index(64, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(64))
        assert torch.equal(gathered_index(64, cp), torch.cat(parts))
        assert len({int((p + 1).sum()) for p in parts}) == 1  # query at position i sees i + 1 keys


def _gathered_attention_on_ranks(cp: int, documents: bool):
    """This rank's output and input gradients of attend_gathered over its chunks, and full attention's."""
    dist.init_process_group("gloo")
    rank, T = dist.get_rank(), 32
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(2, 3, T, 8, generator=g) for _ in range(4))
    doc_ids = (torch.rand(2, T, generator=g) < 0.15).long().cumsum(-1) if documents else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    y = attend(*full, sequence_mask(doc_ids, T, torch.float32))
    (y * grad_out).sum().backward()
    idx = chunk_index(T, cp, rank)
    mine = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    mask = ChunkMask(cp, rank)(doc_ids, T // cp, torch.float32, "cpu")
    y_mine = attend_gathered(*mine, mask, dist.group.WORLD, cp, rank)
    (y_mine * grad_out[:, :, idx]).sum().backward()
    dist.destroy_process_group()
    return idx, y_mine.detach(), [t.grad for t in mine], y.detach(), [t.grad for t in full]


@pytest.mark.parametrize("cp,documents", [(2, False), (4, False), (2, True)])
def test_gathered_attention_equals_full_attention(cp, documents):
    """attend_gathered (K and V all-gathered over the CP group, their gradients reduce-scattered back) on each rank's
    chunks: the output and the q, k, v gradients of full causal attention (within documents: random boundaries),
    within 1e-5 of their scale."""
    for idx, y_mine, grads_mine, y, grads in run_ranks(cp, _gathered_attention_on_ranks, cp, documents):
        assert_close_to_scale(y_mine, y[:, :, idx], 1e-5, "output")
        for name, mine, full in zip("qkv", grads_mine, grads):
            assert_close_to_scale(mine, full[:, :, idx], 1e-5, f"d{name}")


CP_LAYOUTS = {  # name: (world size, overrides), the baseline's global batch (tests/test_training.py)
    "cp2": (2, {"parallel.cp": 2}),
    "cp4": (4, {"parallel.cp": 4}),
    "cp2_tp2": (4, {"parallel.cp": 2, "parallel.tp": 2}),
    "cp2_pp2": (4, {"parallel.cp": 2, "parallel.pp": 2}),
    "cp2_dp2": (4, {"parallel.cp": 2, "train.grad_accum_steps": 1}),
    # with train.compile: tests/test_training.py's cp2_compile_checkpointing
}


@pytest.mark.parametrize("name", list(CP_LAYOUTS))
def test_context_parallel_layout_equals_one_process(name, corpus, baseline, tmp_path):
    world, extra = CP_LAYOUTS[name]
    hist = run_ranks(world, train, debug_overrides(corpus, tmp_path, **{"train.steps": 3, **extra}))[0]
    _assert_same(hist, baseline)


def test_context_parallel_with_documents_equals_one_process(paragraphs, documents_baseline, tmp_path):
    """CP=2 with all three document flags: the mask follows the chunks, the loss is token-weighted (the EOD
    positions eod_mask_loss masks fall unevenly on the two ranks)."""
    hist = run_ranks(2, train, debug_overrides(paragraphs, tmp_path, **{"train.steps": 3, **DOCUMENTS,
                                                                          "parallel.cp": 2}))[0]
    _assert_same(hist, documents_baseline)


@pytest.mark.parametrize("cp", [1, 4])
def test_checkpoint_at_cp2_resumes_at_another_cp(cp, corpus, baseline, tmp_path):
    """Checkpoints do not depend on CP: a step at CP=2, the next two at CP=1 or CP=4 from its checkpoint (weights and
    Adam's moments: the third step's loss follows from the second's update), equal to the unbroken one-process run."""
    kw = {"train.steps": 3}
    first = run_ranks(2, train, debug_overrides(corpus, tmp_path, **kw, **{"parallel.cp": 2,
                                                                             "train.exit_after_steps": 1}))[0]
    rest = run_ranks(cp, train, debug_overrides(corpus, tmp_path, **kw, **{"parallel.cp": cp}))[0]
    assert [h["step"] for h in first + rest] == [1, 2, 3]
    _assert_same(first + rest, baseline)


def test_activations_per_rank_follow_the_prediction():
    """A CP=2 rank's saved activations (each rank's, 256 tokens, batch 2) against bench.memory's prediction from the
    one-process measurement, within 1% (what it leaves out: the int64 positions and key order, 0.3%): half the
    tokens' plus, per layer, the gathered K and V, the attention output held twice and the CPU's two causal masks;
    with activation checkpointing exactly half."""
    from tokenformer_mp.bench.memory import predicted_saved_bytes, rank_activation_bytes
    cfg, batch = _cfg(seq_length=256), 2
    for recompute in ("none", "blocks"):
        one = rank_activation_bytes(cfg, 1, False, batch, recompute)
        per_token = one / (batch * cfg.seq_length)
        for rank, n in enumerate(run_ranks(2, rank_activation_bytes, cfg, 1, False, batch, recompute, False, False, 2)):
            predicted = predicted_saved_bytes(cfg, per_token, 2, recompute, batch, cpu_rank=rank)
            assert abs(n / predicted - 1) < 0.01, (recompute, rank, n, predicted)
            assert predicted > 1.2 * one / 2 if recompute == "none" else predicted == one / 2


def test_reshard_tool_accepts_cp_and_says_it_ignores_it(tmp_path, capsys):
    """tools/reshard_checkpoint.py --cp N: accepted, said to be ignored (checkpoints do not depend on CP), named in
    the command it prints to continue with; the checkpoint it writes is the one it writes without --cp."""
    spec = importlib.util.spec_from_file_location("tools_reshard_checkpoint", REPO / "tools" / "reshard_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = _cfg()
    torch.manual_seed(0)
    write_layout_free(dict(TokenFormer(cfg).named_parameters()), Config(model=cfg), str(tmp_path / "src"))
    assert tool.main(["--load", str(tmp_path / "src"), "--save", str(tmp_path / "cp"), "--tp", "2", "--cp", "2"]) == 0
    err = capsys.readouterr().err
    assert "--cp 2: ignored, checkpoints do not depend on context parallelism" in err
    assert "--parallel.tp 2 --parallel.pp 1 --parallel.cp 2" in err
    assert tool.main(["--load", str(tmp_path / "src"), "--save", str(tmp_path / "plain"), "--tp", "2"]) == 0
    with_cp, plain = load_tensors(str(tmp_path / "cp")), load_tensors(str(tmp_path / "plain"))
    assert with_cp.keys() == plain.keys() and all(torch.equal(with_cp[k], plain[k]) for k in plain)
