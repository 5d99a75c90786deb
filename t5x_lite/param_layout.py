"""The two layouts of a stack of identical layers' params, and the conversions.

  loop     sibling subtrees `layers_0 .. layers_{n-1}`, one per layer
           (`scan_layers=False`).
  scanned  one subtree `layers` whose leaves carry a leading [n] axis
           (`scan_layers=True`, the layers run under `nn.scan`).

Plain tree surgery on params, with no model code, so that checkpoints and the
HF converters can convert a tree without importing the model zoo.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def _is_layer(key: str) -> bool:
  return key.startswith('layers_') and key[len('layers_'):].isdigit()


def _stack(*xs):
  """Stacks on a new leading axis; numpy stays numpy (on the host)."""
  return (np if isinstance(xs[0], np.ndarray) else jnp).stack(xs)


def stack_layers(params: Mapping[str, Any]) -> dict:
  """Unscanned params -> scanned: every `layers_{i}` group becomes `layers`.

  Each group of sibling subtrees `layers_0 .. layers_{n-1}` is replaced by one
  subtree `layers` whose leaves are the layer leaves stacked on a new leading
  axis. Trees without such groups come back unchanged.
  """
  out = {k: stack_layers(v) if isinstance(v, Mapping) else v
         for k, v in params.items() if not _is_layer(k)}
  num = sum(_is_layer(k) for k in params)
  if num:
    group = [params[f'layers_{i}'] for i in range(num)]
    out['layers'] = jax.tree_util.tree_map(_stack, *group)
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict:
  """Scanned params -> unscanned: the inverse of `stack_layers`."""
  out = {k: unstack_layers(v) if isinstance(v, Mapping) else v
         for k, v in params.items() if k != 'layers'}
  if 'layers' in params:
    stacked = params['layers']
    num = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(num):
      out[f'layers_{i}'] = jax.tree_util.tree_map(lambda x: x[i], stacked)
  return out
