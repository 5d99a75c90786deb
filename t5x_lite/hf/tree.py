"""Small tree helpers shared by the family converters."""

from typing import Any, Callable, Mapping

import numpy as np


def set_path(tree: dict, path, value) -> None:
  """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def flatten(tree: Mapping[str, Any], prefix=()) -> dict:
  """Nested dict -> {path tuple: numpy array}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = np.asarray(value)
  return out


def tensor_getter(state_dict: Mapping[str, Any], dtype, family: str, sources: str,
                  config_name: str) -> Callable[[str, tuple], np.ndarray]:
  """`get(name, shape)`: the named tensor as `dtype`; a KeyError names a missing
  tensor, a ValueError one whose shape does not fit the config."""
  def get(name, shape):
    if name not in state_dict:
      raise KeyError(f'HF {family} state dict has no {name!r}; it must come from {sources}.')
    value = np.asarray(state_dict[name])
    if value.shape != tuple(shape):
      raise ValueError(f'{name}: shape {value.shape} does not match the config '
                       f'({tuple(shape)}); check {config_name} against the checkpoint config.')
    return value.astype(dtype)
  return get
