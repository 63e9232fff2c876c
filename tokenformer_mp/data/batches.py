"""The trainer's input: each step's micro-batches, assembled ahead of time in a background thread.

Deterministic: global step s reads samples [s*G, (s+1)*G) of the (already shuffled) dataset, G the global batch, and
a data-parallel rank its slice of those, micro-batch by micro-batch. The data position is therefore the step itself,
which makes a resume exact, and a step reads the same samples whatever the data-parallel size. Sample ranges a spike
guard's rollback skipped (`skip`) move every later step past them, in sample indices, so at any layout too.

With `prefetch` > 0 a thread assembles the next steps' micro-batches (samples stacked into tensors; in pinned
memory when the device is a GPU) while the current step trains, as Megatron's DataLoader workers do, and each is
copied to the device without blocking the host. `wait_s` accumulates the time the training loop spent waiting for
its input. An error while assembling a step (a damaged dataset or index cache) reaches the training loop as a
DataError naming the step and the cause, at the step it belongs to; `wait` can be interrupted (a stop signal), so a
rank waiting for input still acts on it.

With packed documents kept apart (data.reset_attention_mask, data.reset_position_ids) or context parallelism
(parallel.cp) a micro-batch's inputs are a tuple (tokens, position_ids[, doc_ids]) instead of the tokens alone,
assembled by the same thread (see collate). Every rank of a context-parallel group reads the same samples and keeps
its own chunks of them.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError

Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # tokens [mbs, seq], or (tokens, position_ids[, doc_ids])
HostBatch = tuple[Inputs, torch.Tensor, torch.Tensor]  # inputs, labels (int64), loss mask (float32): [mbs, seq]
POLL_S = 0.1  # how often a wait for input looks at its interruption and at the thread


class DataError(ConfigError):
    """A step's input could not be assembled (a damaged dataset or index cache). Bad input like a config error: the
    trainer exits 2 with its message."""


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
                 prefetch: int = 0, packing: Packing | None = None, source: str = "the dataset"):
        """source: what the dataset is, for error messages (the trainer names its prefixes and index cache)."""
        self.ds, self.dp, self.dp_rank, self.mbs, self.accum = dataset, dp, dp_rank, micro_batch, accum
        self.device, self.prefetch, self.wait_s, self.source = device, prefetch, 0.0, source
        self.packing = packing or Packing()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next = None  # the step the thread's next queued batch belongs to
        self._held: tuple[int, list[HostBatch]] | None = None  # taken from the queue by wait(), not yet trained on
        self.skipped: list[tuple[int, int]] = []  # sample ranges [a, b) no step reads (a spike guard's rollback)

    @property
    def global_batch(self) -> int:
        return self.mbs * self.accum * self.dp

    def start_of(self, step: int) -> int:
        """The step's first sample: step x G, moved past each skipped range it reaches. Ranges are recorded where a
        rollback found the data (a = the start of the first step rolled back), in order, so one pass suffices."""
        pos = step * self.global_batch
        for a, b in self.skipped:
            if pos >= a:
                pos += b - a
        return pos

    def skip(self, ranges: list[tuple[int, int]]) -> None:
        """From now on read past these sample ranges; what was assembled ahead is dropped."""
        self.skipped = sorted((int(a), int(b)) for a, b in ranges)
        self.close()

    def host_batches(self, step: int) -> list[HostBatch]:
        """This rank's micro-batches of a step, assembled on the host."""
        base = self.start_of(step) + self.dp_rank * self.mbs * self.accum
        out = []
        for m in range(self.accum):
            samples = [self.ds[i % len(self.ds)] for i in range(base + m * self.mbs, base + (m + 1) * self.mbs)]
            batch = collate(samples, self.packing)
            out.append(tuple(_each(t, torch.Tensor.pin_memory) for t in batch) if self.device.type == "cuda" else batch)
        return out

    def _assemble(self, step: int) -> list[HostBatch]:
        """host_batches, any error in it a DataError naming the step, the data and where it was raised."""
        try:
            return self.host_batches(step)
        except Exception as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            rank = f", data-parallel rank {self.dp_rank}" if self.dp > 1 else ""
            raise DataError(f"the input of step {step + 1}{rank} could not be read from {self.source}: "
                            f"{type(e).__name__}: {e} (at {frame.filename}:{frame.lineno})") from e

    def _producer(self, first: int, q: queue.Queue, stop: threading.Event) -> None:
        step = first
        while not stop.is_set():
            try:
                item = (step, self._assemble(step))
            except DataError as e:  # queued in the step's place: the loop raises it when it reaches that step
                item = (step, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], DataError):
                return
            step += 1

    def _restart(self, step: int) -> None:
        self.close()
        self._queue, self._stop, self._next = queue.Queue(maxsize=self.prefetch), threading.Event(), step
        self._thread = threading.Thread(target=self._producer, args=(step, self._queue, self._stop),
                                        name="batch-prefetch", daemon=True)
        self._thread.start()

    def wait(self, step: int, interrupted: Callable[[], bool] = lambda: False) -> bool:
        """Until the step's input is assembled (True), or interrupted() turns true while it is not (False): a stop
        signal acts while the thread is stuck in a read. The thread's error for this step is raised here."""
        if self.prefetch <= 0 or (self._held is not None and self._held[0] == step):
            return True  # without prefetching the step assembles its own input
        if self._thread is None or self._next != step:  # the first step, or a jump (a resume)
            self._restart(step)
        start = time.perf_counter()
        try:
            while True:
                alive = self._thread.is_alive()  # read before the queue: a thread that ended queued its last item
                try:
                    got, batches = self._queue.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    if not alive:
                        raise DataError(f"the input thread ended before step {step + 1} of {self.source}") from None
                    if interrupted():
                        return False
        finally:
            self.wait_s += time.perf_counter() - start
        assert got == step, (got, step)
        if isinstance(batches, DataError):
            raise batches
        self._held, self._next = (step, batches), step + 1
        return True

    def _take(self, step: int) -> list[HostBatch]:
        if self.prefetch <= 0:
            start = time.perf_counter()
            batches = self._assemble(step)
            self.wait_s += time.perf_counter() - start
            return batches
        self.wait(step)
        batches, self._held = self._held[1], None
        return batches

    def micro_batches(self, step: int):
        """(inputs, (labels, loss_mask)) on the device, one per micro-batch of the step."""
        for batch in self._take(step):
            inputs, labels, mask = (_each(t, lambda x: x.to(self.device, non_blocking=True)) for t in batch)
            yield inputs, (labels, mask)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            # bounded: a thread stuck in a read (what a stop signal interrupted) is left to end with the process
            self._thread.join(timeout=1.0)
            self._thread, self._held = None, None
