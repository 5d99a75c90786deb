"""Pieces every model family's Model wrapper shares."""

from typing import Any, Mapping

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def init_module(module: nn.Module, rng: jax.Array, inputs: Mapping[str, Any]):
  """Boxed variables (with logical partitioning metadata) of `module`.

  `inputs` values may be arrays or shape/dtype structs; only shapes matter.
  """
  arrays = {k: v if isinstance(v, (jax.Array, np.ndarray)) else jnp.ones(v.shape, v.dtype)
            for k, v in inputs.items()}
  params_rng, dropout_rng = jax.random.split(rng)
  return module.init({'params': params_rng, 'dropout': dropout_rng}, **arrays,
                     enable_dropout=False)
