"""The trainer's input: each step's micro-batches, assembled ahead of time in a background thread.

Deterministic: global step s reads samples [s*G, (s+1)*G) of the (already shuffled) dataset, G the global batch, and
a data-parallel rank its slice of those, micro-batch by micro-batch. The data position is therefore the step itself,
which makes a resume exact, and a step reads the same samples whatever the data-parallel size.

With `prefetch` > 0 a thread assembles the next steps' micro-batches (samples stacked into tensors; in pinned
memory when the device is a GPU) while the current step trains, as Megatron's DataLoader workers do, and each is
copied to the device without blocking the host. `wait_s` accumulates the time the training loop spent waiting for
its input.

With packed documents kept apart (data.reset_attention_mask, data.reset_position_ids) or context parallelism
(parallel.cp) a micro-batch's inputs are a tuple (tokens, position_ids[, doc_ids]) instead of the tokens alone,
assembled by the same thread (see collate). Every rank of a context-parallel group reads the same samples and keeps
its own chunks of them.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # tokens [mbs, seq], or (tokens, position_ids[, doc_ids])
HostBatch = tuple[Inputs, torch.Tensor, torch.Tensor]  # inputs, labels (int64), loss mask (float32): [mbs, seq]


@dataclass
class Packing:
    """What a micro-batch's inputs carry besides its tokens (data.reset_attention_mask, data.reset_position_ids,
    parallel.cp)."""
    positions: bool = False  # each token's position id (megatron's: restarting after each EOD if it was asked to)
    eod: int | None = None  # the EOD id, whose tokens end documents: doc_ids for attention within each document
    chunk: torch.Tensor | None = None  # context parallelism: the positions of the sequence this rank holds


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[B, T] -> [B, T]: the document of each token of a packed sample, counted from 0. A document ends with its EOD
    token (Megatron's reset_attention_mask: the tokens after an EOD no longer see it or anything before it)."""
    ends = (tokens == eod).long()
    return ends.cumsum(-1) - ends


def collate(samples: list[dict], packing: Packing) -> HostBatch:
    """Samples -> (inputs, labels, loss_mask): inputs is tokens [B, T], or (tokens, position_ids[, doc_ids]) when
    packing asks for them (a tuple of tensors, as a pipeline stage passes its activations on). Under context
    parallelism every per-token tensor keeps this rank's chunks, [B, T / CP]; doc_ids stay whole [B, T]: the
    documents of every rank's keys."""
    def stack(key, dtype):
        return torch.stack([torch.as_tensor(s[key]) for s in samples]).to(dtype)
    tokens, labels, mask = stack("tokens", torch.int64), stack("labels", torch.int64), stack("loss_mask", torch.float32)
    if not packing.positions:
        return tokens, labels, mask
    if "position_ids" in samples[0]:
        positions = stack("position_ids", torch.int64)
    else:  # a dataset without them (the benchmarks' random tokens): in order
        positions = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    doc_ids = () if packing.eod is None else (document_ids(tokens, packing.eod),)
    if packing.chunk is not None:
        tokens, labels, mask, positions = (t[:, packing.chunk] for t in (tokens, labels, mask, positions))
    return (tokens, positions, *doc_ids), labels, mask


def forward_args(inputs: Inputs, labels: torch.Tensor, loss_mask: torch.Tensor) -> tuple:
    """A micro-batch as TokenFormer.forward's arguments (tokens, labels, loss_mask, cache, position_ids, doc_ids)."""
    tokens, *extra = inputs if isinstance(inputs, tuple) else (inputs,)
    return (tokens, labels, loss_mask, None, *extra)


def _each(inputs: Inputs, fn) -> Inputs:
    return tuple(fn(t) for t in inputs) if isinstance(inputs, tuple) else fn(inputs)


class Batches:
    def __init__(self, dataset, dp: int, dp_rank: int, micro_batch: int, accum: int, device: torch.device,
                 prefetch: int = 0, packing: Packing | None = None):
        self.ds, self.dp, self.dp_rank, self.mbs, self.accum = dataset, dp, dp_rank, micro_batch, accum
        self.device, self.prefetch, self.wait_s = device, prefetch, 0.0
        self.packing = packing or Packing()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next = None  # the step the thread's next queued batch belongs to

    @property
    def global_batch(self) -> int:
        return self.mbs * self.accum * self.dp

    def host_batches(self, step: int) -> list[HostBatch]:
        """This rank's micro-batches of a step, assembled on the host."""
        base = step * self.global_batch + self.dp_rank * self.mbs * self.accum
        out = []
        for m in range(self.accum):
            samples = [self.ds[i % len(self.ds)] for i in range(base + m * self.mbs, base + (m + 1) * self.mbs)]
            batch = collate(samples, self.packing)
            out.append(tuple(_each(t, torch.Tensor.pin_memory) for t in batch) if self.device.type == "cuda" else batch)
        return out

    def _producer(self, first: int, q: queue.Queue, stop: threading.Event) -> None:
        step = first
        while not stop.is_set():
            item = (step, self.host_batches(step))
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    def _restart(self, step: int) -> None:
        self.close()
        self._queue, self._stop, self._next = queue.Queue(maxsize=self.prefetch), threading.Event(), step
        self._thread = threading.Thread(target=self._producer, args=(step, self._queue, self._stop),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()

    def _take(self, step: int) -> list[HostBatch]:
        if self.prefetch <= 0:
            return self.host_batches(step)
        if self._thread is None or self._next != step:  # the first step, or a jump (a resume)
            self._restart(step)
        got, batches = self._queue.get()
        assert got == step, (got, step)
        self._next = step + 1
        return batches

    def micro_batches(self, step: int):
        """(inputs, (labels, loss_mask)) on the device, one per micro-batch of the step."""
        start = time.perf_counter()
        host = self._take(step)
        self.wait_s += time.perf_counter() - start
        for batch in host:
            inputs, labels, mask = (_each(t, lambda x: x.to(self.device, non_blocking=True)) for t in batch)
            yield inputs, (labels, mask)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
