"""Hugging Face interop: export-hf (export.py) and the modeling code it ships (imports nothing of this package).

The config field names on both sides are in tokenformer_mp.inference, which reads these exports back."""
