"""tokenformer_mp: tensor-, pipeline- and data-parallel training of TokenFormer language models."""

import warnings

# megatron-core warns on import when Transformer Engine / Apex are absent; we use neither.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
