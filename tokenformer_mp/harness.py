"""lm-evaluation-harness over the project's own inference: any checkpoint or export, scored in batches.

Requests are tokenized, ordered and cut exactly as lm-eval's own Hugging Face model does (TemplateLM's context /
continuation split, its Collator's longest-first order, its rolling windows), so the two give the same numbers on the
same weights (tests/test_lm_eval.py). Registered as lm-eval model "tokenformer".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .inference import DTYPES, default_dtype, load_model, tokenizer_for
from .model import KVCache


@register_model("tokenformer")
class TokenFormerLM(TemplateLM):
    def __init__(self, pretrained: str, batch_size: int | str = 8, device: str | None = None, dtype: str | None = None,
                 tokenizer_type: str | None = None, tokenizer_model: str | None = None, max_gen_toks: int = 256,
                 max_batch_size: int | None = None):
        """device: cuda when available; dtype: bf16 on a GPU, fp32 on a CPU (scores are fp32 either way).
        max_batch_size: accepted for lm-eval's model registry, which passes it; the batch size is fixed."""
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or default_dtype(device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
        self.model, config = load_model(pretrained, device, dtype)
        self.tok = tokenizer_for(config, tokenizer_type, tokenizer_model)
        self.batch_size, self._device, self.max_gen_toks = int(batch_size), torch.device(device), int(max_gen_toks)
        self.max_length = self.model.cfg.seq_length

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    # prefix_token_id (TemplateLM's): eod, the token every document follows in training; the export's bos too.

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded batch -> logits [B, T, V]. Causal: a row's padding cannot reach its own positions."""
        T = max(map(len, rows))
        x = torch.tensor([r + [self.tok.eod] * (T - len(r)) for r in rows], device=self.device)
        return self.model(x)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (log P(continuation | context), whether greedy gives it)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in order.get_batched(n=self.batch_size):
            # the last max_length + 1 tokens, less the last: the positions that predict every continuation token
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logits = self._logits(rows)
            for (key, _, cont), row, lg in zip(chunk, rows, logits):
                logp = F.log_softmax(lg[len(row) - len(cont):len(row)].float(), dim=-1)  # [len(cont), V]
                target = torch.tensor(cont, device=logp.device)
                answer = (logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
                out.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint max_length windows, each conditioned on what precedes it."""
        windows, counts = [], []
        for (text,) in [r.args for r in requests]:
            w = [make_disjoint_window(x) for x in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in w]
            counts.append(len(w))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm))
        return [sum(next(scores)[0] for _ in range(n)) for n in counts]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or temperature-sampled) continuations, cut at the first stop string. Batched over prompts of
        the same token length (the model has no padding mask), longest first; each batch grows one KV cache."""
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok.decode([self.tok.eod])
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            kwargs = normalize_gen_kwargs(chunk[0][1], self.max_gen_toks)
            until, max_new = handle_stop_sequences(kwargs.pop("until", None), eos), kwargs.pop("max_gen_toks")
            temperature = kwargs.pop("temperature", 0.0) * bool(kwargs.pop("do_sample", False))  # 0: greedy
            if kwargs:
                raise ValueError(f"generation settings not supported: {', '.join(kwargs)} (supported: until, "
                                 f"max_gen_toks, do_sample, temperature)")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no context in the model's {self.max_length}")
            prompts = [self.tok_encode(ctx)[-(self.max_length - max_new):] for ctx, _ in chunk]
            by_length: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_length.setdefault(len(p), []).append(i)
            texts = [""] * len(chunk)
            for rows in by_length.values():
                for i, text in zip(rows, self._generate([prompts[i] for i in rows], max_new, until, temperature)):
                    texts[i] = text
            out += texts
            bar.update(len(chunk))
        bar.close()
        return order.get_original(out)

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float) -> list[str]:
        """Equal-length prompts [B, T] -> each row's text up to its first stop string or eod."""
        cache = KVCache(self.model.cfg)
        logits = self.model(torch.tensor(prompts, device=self.device), cache=cache)[:, -1].float()
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new):
            logits[:, self.tok.vocab_size:] = float("-inf")  # embedding rows past the vocabulary are no tokens
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    done[i] = t == self.tok.eod
                    if not done[i]:
                        new[i].append(t)
                        done[i] = any(s and s in self.tok.decode(new[i]) for s in until)
            if all(done):
                break
            logits = self.model(nxt[:, None], cache=cache)[:, -1].float()
        return [postprocess_generated_text(self.tok.decode(ids), until, None) for ids in new]
