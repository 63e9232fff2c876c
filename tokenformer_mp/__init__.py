"""tokenformer_mp: tensor-, pipeline- and data-parallel training of TokenFormer language models."""
