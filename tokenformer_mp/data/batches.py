"""The trainer's input: each step's micro-batches, assembled ahead of time in a background thread.

Deterministic: global step s reads samples [s*G, (s+1)*G) of the (already shuffled) dataset, G the global batch, and
a data-parallel rank its slice of those, micro-batch by micro-batch. The data position is therefore the step itself,
which makes a resume exact, and a step reads the same samples whatever the data-parallel size.

With `prefetch` > 0 a thread assembles the next steps' micro-batches (samples stacked into tensors; in pinned
memory when the device is a GPU) while the current step trains, as Megatron's DataLoader workers do, and each is
copied to the device without blocking the host. `wait_s` accumulates the time the training loop spent waiting for
its input.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

HostBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens, labels (int64), loss mask (float32): [mbs, seq]


class Batches:
    def __init__(self, dataset, dp: int, dp_rank: int, micro_batch: int, accum: int, device: torch.device,
                 prefetch: int = 0):
        self.ds, self.dp, self.dp_rank, self.mbs, self.accum = dataset, dp, dp_rank, micro_batch, accum
        self.device, self.prefetch, self.wait_s = device, prefetch, 0.0
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
            batch = tuple(torch.stack([torch.as_tensor(s[k]) for s in samples]).to(dtype)
                          for k, dtype in (("tokens", torch.int64), ("labels", torch.int64),
                                           ("loss_mask", torch.float32)))
            out.append(tuple(t.pin_memory() for t in batch) if self.device.type == "cuda" else batch)
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
        """(tokens, (labels, loss_mask)) on the device, one per micro-batch of the step."""
        start = time.perf_counter()
        host = self._take(step)
        self.wait_s += time.perf_counter() - start
        for tokens, labels, mask in host:
            tokens, labels, mask = (t.to(self.device, non_blocking=True) for t in (tokens, labels, mask))
            yield tokens, (labels, mask)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
