"""Hugging Face GPT-2 weights <-> t5x_lite `models.decoder` params.

Works on plain `{name: numpy array}` state dicts, so torch is not needed here:
with torch, `{k: v.numpy() for k, v in model.state_dict().items()}`; from a
safetensors file, `safetensors.numpy.load_file(path)`. Names follow
`GPT2LMHeadModel`; the leading `transformer.` is optional, so a `GPT2Model`
state dict works too. The `attn.bias` / `attn.masked_bias` buffers of older
checkpoints are ignored. The LM head is tied to `wte`.

HF's GPT-2 uses `Conv1D` layers, whose weights are already [in, out] like
ours; `attn.c_attn` holds the query, key and value kernels side by side
([D, 3*D]: q | k | v).
"""

from typing import Mapping

import numpy as np

from t5x_lite import param_layout
from t5x_lite.hf import tree
from t5x_lite.models import common
from t5x_lite.models import decoder
from t5x_lite.models.decoder import GPTConfig

MODEL_CLS = decoder.DecoderModel

_ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu',
                'gelu': 'gelu_exact', 'relu': 'relu'}


def config_from_hf(hf_config: Mapping) -> GPTConfig:
  """The parsed `config.json` of a HF GPT-2 model -> our GPTConfig.

  Our `dropout_rate` (embeddings and residuals) takes `resid_pdrop`; GPT-2
  sets `embd_pdrop` to the same value. Raises ValueError naming the setting
  for what this model does not support.
  """
  get = lambda key, default: (default if hf_config.get(key) is None
                              else hf_config[key])
  model_type = get('model_type', 'gpt2')
  if model_type != 'gpt2':
    raise ValueError(f"HF config has model_type={model_type!r}; this "
                     "converter reads GPT-2 ('gpt2') checkpoints only.")
  unsupported = {'scale_attn_by_inverse_layer_idx': True,
                 'reorder_and_upcast_attn': True, 'add_cross_attention': True,
                 'scale_attn_weights': False, 'tie_word_embeddings': False}
  for key, bad in unsupported.items():
    if key in hf_config and hf_config[key] == bad:
      raise ValueError(f'HF GPT-2 config sets {key}={bad}, which our decoder '
                       f'does not support; only {key}={not bad} converts.')
  activation = get('activation_function', 'gelu_new')
  if activation not in _ACTIVATIONS:
    raise ValueError(f'HF GPT-2 activation_function={activation!r} is not '
                     f'supported; use one of {sorted(_ACTIVATIONS)}.')
  emb_dim, num_heads = get('n_embd', 768), get('n_head', 12)
  if emb_dim % num_heads:
    raise ValueError(f'HF GPT-2 config: n_embd={emb_dim} is not divisible by '
                     f'n_head={num_heads}.')
  return GPTConfig(
      vocab_size=get('vocab_size', 50257),
      emb_dim=emb_dim,
      num_heads=num_heads,
      head_dim=emb_dim // num_heads,
      mlp_dim=get('n_inner', 4 * emb_dim),
      num_layers=get('n_layer', 12),
      max_positions=get('n_positions', 1024),
      dropout_rate=get('resid_pdrop', 0.1),
      attention_dropout_rate=get('attn_pdrop', 0.1),
      layer_norm_eps=get('layer_norm_epsilon', 1e-5),
      activation=_ACTIVATIONS[activation],
      initializer_range=get('initializer_range', 0.02))


def config_to_hf(config: GPTConfig) -> dict:
  """GPTConfig -> HF `GPT2LMHeadModel` config.json fields (tied LM head)."""
  _check_config(config)
  names = {'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'relu': 'relu'}
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
      'vocab_size': config.vocab_size, 'n_embd': config.emb_dim, 'n_head': config.num_heads,
      'n_layer': config.num_layers, 'n_positions': config.max_positions,
      'n_inner': config.mlp_dim, 'activation_function': names[config.activation],
      'resid_pdrop': config.dropout_rate, 'embd_pdrop': config.dropout_rate,
      'attn_pdrop': config.attention_dropout_rate,
      'layer_norm_epsilon': config.layer_norm_eps,
      'initializer_range': config.initializer_range, 'tie_word_embeddings': True}


def _layer_map(i: int) -> dict:
  """Our module path (tuple) -> HF module name, for decoder layer i."""
  ours, hf = ('decoder', f'layers_{i}'), f'h.{i}'
  return {
      ours + ('pre_self_attention_layer_norm',): f'{hf}.ln_1',
      ours + ('self_attention', 'out'): f'{hf}.attn.c_proj',
      ours + ('pre_mlp_layer_norm',): f'{hf}.ln_2',
      ours + ('mlp', 'wi'): f'{hf}.mlp.c_fc',
      ours + ('mlp', 'wo'): f'{hf}.mlp.c_proj',
  }



def _check_config(config: GPTConfig):
  if config.num_heads * config.head_dim != config.emb_dim:
    raise ValueError(f'GPT-2 needs num_heads * head_dim == emb_dim; got '
                     f'{config.num_heads} * {config.head_dim} != '
                     f'{config.emb_dim}.')


def from_hf_state_dict(state_dict: Mapping[str, np.ndarray],
                       config: GPTConfig) -> dict:
  """HF `GPT2LMHeadModel` / `GPT2Model` state dict -> our (unboxed) params.

  Raises KeyError naming missing tensors and ValueError on shape mismatch
  (e.g. a config that does not fit the checkpoint).
  """
  _check_config(config)
  sd = {}
  for k, v in state_dict.items():
    sd[k[len('transformer.'):] if k.startswith('transformer.') else k] = v
  dtype = np.dtype(config.param_dtype)

  get = tree.tensor_getter(
      sd, dtype, 'GPT-2', 'GPT2LMHeadModel or GPT2Model with the same num_layers', 'GPTConfig')

  d, v, f = config.emb_dim, config.vocab_size, config.mlp_dim
  params = {
      'token_embedder': {'embedding': get('wte.weight', (v, d))},
      'position_embedder': {
          'embedding': get('wpe.weight', (config.max_positions, d))},
      'decoder': {'decoder_norm': {'scale': get('ln_f.weight', (d,)),
                                   'bias': get('ln_f.bias', (d,))}},
  }
  shapes = {'out': (d, d), 'wi': (d, f), 'wo': (f, d)}
  for i in range(config.num_layers):
    for path, hf in _layer_map(i).items():
      if path[-1] in shapes:
        n_in, n_out = shapes[path[-1]]
        tree.set_path(params, path, {'kernel': get(f'{hf}.weight', (n_in, n_out)),
                            'bias': get(f'{hf}.bias', (n_out,))})
      else:
        tree.set_path(params, path, {'scale': get(f'{hf}.weight', (d,)),
                            'bias': get(f'{hf}.bias', (d,))})
    c_attn = f'h.{i}.attn.c_attn'
    kernels = np.split(get(f'{c_attn}.weight', (d, 3 * d)), 3, axis=1)
    biases = np.split(get(f'{c_attn}.bias', (3 * d,)), 3)
    attention = params['decoder'][f'layers_{i}']['self_attention']
    for name, kernel, bias in zip(('query', 'key', 'value'), kernels, biases):
      attention[name] = {'kernel': kernel, 'bias': bias}
  if 'lm_head.weight' in sd and not np.array_equal(
      np.asarray(sd['lm_head.weight']), np.asarray(sd['wte.weight'])):
    raise ValueError('lm_head.weight differs from transformer.wte.weight; our '
                     'LM head is tied to the token embedding.')
  return common.to_config_layout(params, config)  # stacked iff scan_layers


def to_hf_state_dict(params, config: GPTConfig) -> dict:
  """Our params -> HF `GPT2LMHeadModel` state dict of numpy arrays."""
  params = param_layout.unstack_layers(params)
  _check_config(config)
  p = tree.flatten(params)
  t = 'transformer'
  sd = {f'{t}.wte.weight': p[('token_embedder', 'embedding')],
        f'{t}.wpe.weight': p[('position_embedder', 'embedding')],
        f'{t}.ln_f.weight': p[('decoder', 'decoder_norm', 'scale')],
        f'{t}.ln_f.bias': p[('decoder', 'decoder_norm', 'bias')]}
  for i in range(config.num_layers):
    for path, hf in _layer_map(i).items():
      is_norm = 'layer_norm' in path[-1]
      sd[f'{t}.{hf}.weight'] = p[path + ('scale' if is_norm else 'kernel',)]
      sd[f'{t}.{hf}.bias'] = p[path + ('bias',)]
    attention = ('decoder', f'layers_{i}', 'self_attention')
    qkv = ('query', 'key', 'value')
    sd[f'{t}.h.{i}.attn.c_attn.weight'] = np.concatenate(
        [p[attention + (n, 'kernel')] for n in qkv], axis=1)
    sd[f'{t}.h.{i}.attn.c_attn.bias'] = np.concatenate(
        [p[attention + (n, 'bias')] for n in qkv])
  sd['lm_head.weight'] = sd[f'{t}.wte.weight']
  return sd
