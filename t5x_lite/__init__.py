"""t5x_lite: pretrain, fine-tune, post-train and evaluate Transformers in JAX/Flax.

Importing it changes nothing in the process; the entry points tune the host
where a run starts (t5x_lite.host.prepare).
"""

__version__ = "0.1.0"
