"""Hugging Face checkpoints <-> t5x_lite models, one module per family."""
