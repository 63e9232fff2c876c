"""Process groups: megatron-core's parallel_state creates them, DeepSpeed is handed the same ones.

Both lay ranks out tp-fastest, then cp, then dp, then pp; we assert it so a future change of order cannot silently
mismatch the groups DeepSpeed's pipeline grid builds from its topology. DeepSpeed knows no context parallelism: its
data-parallel group (gradient reduction, ZeRO's partitions, the pipeline topology's data axis) is DP x CP, the ranks
that hold the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch.distributed as dist
from megatron.core import parallel_state as ps


def initialize(tp: int, pp: int, timeout_s: int = 600, cp: int = 1) -> None:
    if not ps.model_parallel_is_initialized():
        # No gloo side groups: nothing here uses them, and across nodes they need TCP between hosts besides NCCL's
        # network (a classic multi-node hang).
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp,
                                     distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
                                     create_gloo_process_groups=False)
    world = dist.get_world_size()
    rank = dist.get_rank()
    dp = world // (tp * pp * cp)
    expect = (rank % tp, (rank // tp) % cp, (rank // (tp * cp)) % dp, rank // (tp * cp * dp))
    got = (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(), ps.get_data_parallel_rank(),
           ps.get_pipeline_model_parallel_rank())
    assert got == expect, f"unexpected megatron rank layout (tp, cp, dp, pp) {got}, expected {expect}"


def tp_group():
    return ps.get_tensor_model_parallel_group()


def cp_group():
    return ps.get_context_parallel_group()


def dp_cp_group():
    """The ranks holding the same weights: DeepSpeed's data-parallel group."""
    return ps.get_data_parallel_group(with_context_parallel=True)


def sizes() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "cp": ps.get_context_parallel_world_size()}


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: the parallel sizes, its data-parallel rank and its global rank."""
    tp: int
    pp: int
    dp: int
    dp_rank: int
    rank: int
    world: int
    cp: int = 1  # context parallelism: every rank of a CP group reads the same samples (dp_rank), its own chunks
    cp_rank: int = 0

    def as_dict(self) -> dict[str, int]:
        """The sizes, as a checkpoint's manifest records them (source_layout)."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, **({"cp": self.cp} if self.cp > 1 else {})}


def layout() -> Layout:
    """This rank's Layout, once initialize() has run."""
    s = sizes()
    return Layout(s["tp"], s["pp"], s["dp"], ps.get_data_parallel_rank(), dist.get_rank(), dist.get_world_size(),
                  s["cp"], ps.get_context_parallel_rank())


class MPU:
    """The mpu interface DeepSpeed expects (GPT-NeoX style), over megatron-core's groups. Used when PP == 1."""

    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_data_parallel_group = staticmethod(partial(ps.get_data_parallel_group, with_context_parallel=True))
    get_data_parallel_rank = staticmethod(partial(ps.get_data_parallel_rank, with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(partial(ps.get_data_parallel_world_size, with_context_parallel=True))
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
