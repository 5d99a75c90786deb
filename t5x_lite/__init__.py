"""t5x_lite: pretrain, fine-tune, post-train and evaluate Transformers in JAX/Flax."""

__version__ = "0.1.0"

import os as _os

# TensorFlow is used only for input pipelines; keep its C++ start-up chatter
# (CUDA probing, oneDNN notices) off the console unless asked for.
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
