"""Hugging Face Llama, Mistral and Qwen2 weights <-> t5x_lite `models.llama` params.

Works on plain `{name: numpy array}` state dicts (no torch). Names follow
`LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`, which share
them; the leading `model.` is optional, so a bare `LlamaModel` state dict
works too (its LM head then must be tied). torch's Linear weights are
[out, in], ours [in, out], so every projection is transposed; the query and
key rows are in HF's "rotate half" order, which `t5x_lite.rotary` uses, so
nothing is permuted; our key and value kernels [D, K, H] are HF's [K*H, D]
transposed and split by head. `rotary_emb.inv_freq` buffers of older checkpoints are
ignored (the frequencies come from the config).

Configs are read in both spellings: transformers 5's `rope_parameters`
({'rope_type', 'rope_theta', ...}) and the older `rope_theta` +
`rope_scaling`.
"""

from typing import Any, Mapping

import numpy as np

from t5x_lite import param_layout
from t5x_lite.hf import tree
from t5x_lite.models import common
from t5x_lite.models import llama
from t5x_lite.models.llama import LlamaConfig
from t5x_lite.rotary import RopeScaling

MODEL_CLS = llama.LlamaModel

MODEL_TYPES = ('llama', 'mistral', 'qwen2')
_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                  'qwen2': 'Qwen2ForCausalLM'}


def _rope(hf_config: Mapping) -> tuple:
  """(rope_theta, RopeScaling or None) from either config spelling."""
  params = dict(hf_config.get('rope_parameters') or {})
  legacy = dict(hf_config.get('rope_scaling') or {})
  theta = params.get('rope_theta', hf_config.get('rope_theta', 10000.0))
  scaling = params if params.get('rope_type', 'default') != 'default' else legacy
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'default':
    return float(theta), None
  if kind != 'llama3':
    raise ValueError(f"HF config has rope_type={kind!r}; only 'default' and 'llama3' "
                     'RoPE convert.')
  return float(theta), RopeScaling(
      factor=float(scaling['factor']), low_freq_factor=float(scaling['low_freq_factor']),
      high_freq_factor=float(scaling['high_freq_factor']),
      original_max_position_embeddings=int(scaling['original_max_position_embeddings']))


def _sliding_window(hf_config: Mapping, model_type: str):
  """Mistral's `sliding_window`; Qwen2's only with `use_sliding_window` on
  every layer (a window on some layers only does not convert)."""
  if model_type == 'mistral':
    return hf_config.get('sliding_window')
  if model_type == 'qwen2' and hf_config.get('use_sliding_window'):
    kinds = hf_config.get('layer_types')
    if not kinds:  # older configs: the layers from max_window_layers on
      first = hf_config.get('max_window_layers', 0)
      kinds = ['sliding_attention' if i >= first else 'full_attention'
               for i in range(hf_config.get('num_hidden_layers', 32))]
    if set(kinds) == {'full_attention'}:
      return None
    if set(kinds) != {'sliding_attention'}:
      raise ValueError('HF Qwen2 config uses a sliding window on some layers only '
                       '(max_window_layers / layer_types), which our model does not '
                       'support; only all layers or none convert.')
    return hf_config.get('sliding_window')
  return None


def config_from_hf(hf_config: Mapping) -> LlamaConfig:
  """The parsed `config.json` of a HF Llama / Mistral / Qwen2 model -> LlamaConfig.

  Raises ValueError naming the setting for what our model does not support.
  """
  get = lambda key, default: (default if hf_config.get(key) is None
                              else hf_config[key])
  model_type = get('model_type', 'llama')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'HF config has model_type={model_type!r}; this converter reads '
                     f"{', '.join(MODEL_TYPES)} checkpoints only.")
  activation = get('hidden_act', 'silu')
  if activation != 'silu':
    raise ValueError(f"HF config has hidden_act={activation!r}; only 'silu' (SwiGLU) "
                     'converts.')
  for key in ('mlp_bias', 'attention_bias'):
    if model_type == 'llama' and get(key, False):
      raise ValueError(f'HF Llama config sets {key}=True, which our model does not '
                       f'support; only {key}=False converts.')
  emb_dim, num_heads = get('hidden_size', 4096), get('num_attention_heads', 32)
  rope_theta, rope_scaling = _rope(hf_config)
  return LlamaConfig(
      vocab_size=get('vocab_size', 32000),
      emb_dim=emb_dim,
      num_heads=num_heads,
      num_kv_heads=get('num_key_value_heads', num_heads),
      head_dim=get('head_dim', emb_dim // num_heads),
      mlp_dim=get('intermediate_size', 11008),
      num_layers=get('num_hidden_layers', 32),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      rms_norm_eps=get('rms_norm_eps', 1e-6),
      qkv_bias=model_type == 'qwen2',
      sliding_window=_sliding_window(hf_config, model_type),
      tie_word_embeddings=bool(get('tie_word_embeddings', False)),
      max_positions=get('max_position_embeddings', 2048),
      attention_dropout_rate=get('attention_dropout', 0.0),
      initializer_range=get('initializer_range', 0.02))


def config_to_hf(config: LlamaConfig) -> dict:
  """LlamaConfig -> HF config.json fields: Qwen2 with `qkv_bias`, Mistral with
  a `sliding_window`, else Llama."""
  model_type = 'qwen2' if config.qkv_bias else (
      'mistral' if config.sliding_window is not None else 'llama')
  rope = {'rope_type': 'default', 'rope_theta': config.rope_theta}
  if config.rope_scaling is not None:
    s = config.rope_scaling
    rope.update(rope_type='llama3', factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
  out = {
      'architectures': [_ARCHITECTURES[model_type]], 'model_type': model_type,
      'vocab_size': config.vocab_size, 'hidden_size': config.emb_dim,
      'intermediate_size': config.mlp_dim, 'num_hidden_layers': config.num_layers,
      'num_attention_heads': config.num_heads, 'num_key_value_heads': config.num_kv_heads,
      'head_dim': config.head_dim, 'hidden_act': 'silu',
      'max_position_embeddings': config.max_positions, 'rms_norm_eps': config.rms_norm_eps,
      'rope_parameters': rope, 'rope_theta': config.rope_theta,
      'rope_scaling': None if config.rope_scaling is None else dict(rope),
      'tie_word_embeddings': config.tie_word_embeddings,
      'attention_dropout': config.attention_dropout_rate,
      'initializer_range': config.initializer_range,
  }
  if model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  if model_type == 'mistral':
    out['sliding_window'] = config.sliding_window
  if model_type == 'qwen2':
    window = config.sliding_window is not None
    out.update(use_sliding_window=window, sliding_window=config.sliding_window,
               max_window_layers=0 if window else config.num_layers)
  return out


def _layer_map(i: int) -> dict:
  """Our module path (tuple) -> HF module name, for decoder layer i."""
  ours, hf = ('decoder', f'layers_{i}'), f'layers.{i}'
  attention, mlp = ours + ('self_attention',), ours + ('mlp',)
  return {
      ours + ('pre_self_attention_layer_norm',): f'{hf}.input_layernorm',
      ours + ('pre_mlp_layer_norm',): f'{hf}.post_attention_layernorm',
      attention + ('query',): f'{hf}.self_attn.q_proj',
      attention + ('key',): f'{hf}.self_attn.k_proj',
      attention + ('value',): f'{hf}.self_attn.v_proj',
      attention + ('out',): f'{hf}.self_attn.o_proj',
      mlp + ('wi_0',): f'{hf}.mlp.gate_proj',
      mlp + ('wi_1',): f'{hf}.mlp.up_proj',
      mlp + ('wo',): f'{hf}.mlp.down_proj',
  }


def _shapes(config: LlamaConfig) -> dict:
  """HF's [in, out] per module name (our key / value kernels are [D, K, H])."""
  d, f = config.emb_dim, config.mlp_dim
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  return {'query': (d, q), 'key': (d, kv), 'value': (d, kv), 'out': (q, d),
          'wi_0': (d, f), 'wi_1': (d, f), 'wo': (f, d)}


def from_hf_state_dict(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
  """HF `*ForCausalLM` / `*Model` state dict -> our (unboxed) params.

  Raises KeyError naming missing tensors and ValueError on shape mismatch
  (e.g. a config that does not fit the checkpoint).
  """
  sd = {(k[len('model.'):] if k.startswith('model.') else k): v
        for k, v in state_dict.items()}
  get = tree.tensor_getter(sd, np.dtype(config.param_dtype), 'Llama',
                           '*ForCausalLM or *Model with the same num_layers', 'LlamaConfig')
  d, v = config.emb_dim, config.vocab_size
  params = {'token_embedder': {'embedding': get('embed_tokens.weight', (v, d))},
            'decoder': {'decoder_norm': {'scale': get('norm.weight', (d,))}}}
  shapes = _shapes(config)
  heads = (config.num_kv_heads, config.head_dim)  # the key / value kernels' [K, H]
  for i in range(config.num_layers):
    for path, hf in _layer_map(i).items():
      name = path[-1]
      if name not in shapes:  # a norm
        tree.set_path(params, path, {'scale': get(f'{hf}.weight', (d,))})
        continue
      n_in, n_out = shapes[name]
      out_dims = heads if name in ('key', 'value') else (n_out,)
      leaves = {'kernel': get(f'{hf}.weight', (n_out, n_in)).T.reshape((n_in,) + out_dims)}
      if config.qkv_bias and name in ('query', 'key', 'value'):
        leaves['bias'] = get(f'{hf}.bias', (n_out,)).reshape(out_dims)
      tree.set_path(params, path, leaves)
  if config.tie_word_embeddings:
    if 'lm_head.weight' in sd and not np.array_equal(
        np.asarray(sd['lm_head.weight']), np.asarray(sd['embed_tokens.weight'])):
      raise ValueError('lm_head.weight differs from model.embed_tokens.weight but the '
                       'config ties them (tie_word_embeddings=True).')
  else:
    params['logits_dense'] = {'kernel': get('lm_head.weight', (v, d)).T}
  return common.to_config_layout(params, config)  # stacked iff scan_layers


def to_hf_state_dict(params, config: LlamaConfig) -> dict:
  """Our params -> HF `*ForCausalLM` state dict of numpy arrays ([out, in])."""
  p = tree.flatten(param_layout.unstack_layers(params))
  sd = {'model.embed_tokens.weight': p[('token_embedder', 'embedding')],
        'model.norm.weight': p[('decoder', 'decoder_norm', 'scale')]}
  shapes = _shapes(config)
  for i in range(config.num_layers):
    for path, hf in _layer_map(i).items():
      if path[-1] not in shapes:
        sd[f'model.{hf}.weight'] = p[path + ('scale',)]
        continue
      n_in, n_out = shapes[path[-1]]
      sd[f'model.{hf}.weight'] = np.ascontiguousarray(
          p[path + ('kernel',)].reshape(n_in, n_out).T)
      if path + ('bias',) in p:
        sd[f'model.{hf}.bias'] = p[path + ('bias',)].reshape(n_out)
  sd['lm_head.weight'] = (sd['model.embed_tokens.weight'] if config.tie_word_embeddings
                          else np.ascontiguousarray(p[('logits_dense', 'kernel')].T))
  return sd
