"""tokenformer_mp: tensor-, pipeline- and data-parallel training of TokenFormer language models.

`from tokenformer_mp import Pattention`: the layer alone, a drop-in for nn.Linear ([..., d_in] -> [..., d_out]).
"""

import warnings

# megatron-core warns on import when Transformer Engine / Apex are absent; we use neither.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

__all__ = ["Pattention"]


def __getattr__(name: str):
    # On first use: `import tokenformer_mp` (every tool and rank imports the package first) need not import torch,
    # 1-4 s (python -X importtime).
    if name == "Pattention":
        from .model import Pattention
        return Pattention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
