"""t5x_lite: pretrain, fine-tune, post-train and evaluate Transformers in JAX/Flax."""

__version__ = "0.1.0"
