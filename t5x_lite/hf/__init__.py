"""Hugging Face checkpoints <-> t5x_lite models, one module per family.

    model, params = t5x_lite.hf.load('/path/to/hf_model_dir')
    logits = model.logits(params, batch)

Every family module (t5, bert, gpt2, bart, llama) has the same interface:
`config_from_hf(config_json_dict) -> Config`,
`from_hf_state_dict({name: np.ndarray}, config) -> params`,
`to_hf_state_dict(params, config) -> {name: np.ndarray}` and `MODEL_CLS`,
constructed as `MODEL_CLS(config)`; optionally `ARCHITECTURES`, HF
architecture names (e.g. 'BertForSequenceClassification') mapped to
`fn(config, state_dict) -> (model, params)`. None of them imports torch.
"""

import dataclasses
import importlib
from typing import Any, Optional, Tuple

import jax
import numpy as np

from t5x_lite.errors import UserError
from t5x_lite.hf import io

# HF `model_type` -> family module under t5x_lite.hf.
FAMILIES = {'t5': 't5', 'mt5': 't5', 'bert': 'bert', 'gpt2': 'gpt2',
            'bart': 'bart', 'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama'}


def family_module(model_type: str):
  """The converter module for a HF `model_type` (imported on demand)."""
  if model_type not in FAMILIES:
    raise UserError(f'model_type {model_type!r} is not supported; supported: '
                    f"{', '.join(sorted(FAMILIES))}.")
  return importlib.import_module(f't5x_lite.hf.{FAMILIES[model_type]}')


def load(directory: str, dtype: Optional[Any] = None, **config_overrides) -> Tuple[Any, dict]:
  """Reads a HF model directory -> (our Model, params).

  Args:
    directory: holds `config.json` and weights (see `hf.io.read_state_dict`).
    dtype: dtype of the returned params (and of the config's `param_dtype`);
      default float32, whatever the checkpoint stores.
    **config_overrides: config fields to set, e.g. `scan_layers=True` (params
      then come stacked) or `dropout_rate=0.0`.

  Returns:
    (model, params): `model` is the family's Model wrapper, `params` the
    unboxed param tree as numpy arrays, ready for `model.logits(params, batch)`.
  """
  hf_config = io.read_config(directory)
  model_type = hf_config.get('model_type')
  module = family_module(model_type)
  try:
    config = module.config_from_hf(hf_config)
    if dtype is not None:
      config_overrides['param_dtype'] = np.dtype(dtype).name
    config = dataclasses.replace(config, **config_overrides)
    state = io.read_state_dict(directory)
    heads = getattr(module, 'ARCHITECTURES', {})
    build = next((heads[a] for a in hf_config.get('architectures') or () if a in heads), None)
    if build is not None:  # e.g. BertForSequenceClassification: its own head
      model, params = build(config, state)
    else:
      model, params = module.MODEL_CLS(config), module.from_hf_state_dict(state, config)
  except (KeyError, ValueError) as e:
    message = e.args[0] if e.args else str(e)
    raise UserError(f'{directory}: {message}') from None
  target = np.dtype(dtype if dtype is not None else np.float32)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, target), params)
  return model, params


def gin_text(model: Any) -> str:
  """The model's configuration as includable gin text.

  Binds `MODEL = @<module>.<ModelClass>()`, its `config` to
  `@<module>.<ConfigClass>()` and one binding per config field, so a run gin
  can `include` it in place of a configs/models/*.gin file.
  """
  config = model.config
  imports, names = [], []
  for cls in (type(model), type(config)):
    package, module = cls.__module__.rsplit('.', 1)
    imports.append(f'from {package} import {module}')
    names.append(f'{module}.{cls.__name__}')
  model_name, config_name = names
  lines = ['from __gin__ import dynamic_registration',
           *dict.fromkeys(imports), '',
           f'MODEL = @{model_name}()',
           f'{model_name}.config = @{config_name}()', '']
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):  # e.g. Llama's rope_scaling: a dict in gin
      value = dataclasses.asdict(value)
    elif not isinstance(value, (bool, int, float, str, tuple, type(None))):
      value = np.dtype(value).name  # a dtype object
    lines.append(f'{config_name}.{field.name} = {value!r}')
  return '\n'.join(lines) + '\n'
