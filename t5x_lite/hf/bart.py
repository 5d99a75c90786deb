"""Hugging Face BART weights <-> t5x_lite `models.bart` params.

Works on plain `{name: numpy array}` state dicts, so torch is not needed here:
with torch, `{k: v.numpy() for k, v in model.state_dict().items()}`; from a
safetensors file, `safetensors.numpy.load_file(path)`. Names follow
`BartForConditionalGeneration`; a `BartModel` state dict (no `model.` prefix)
works too, with `final_logits_bias` taken as zeros. The LM head and the
per-stack `embed_tokens` are aliases of `shared` (checked when present).
HF stores linear weights as [out, in]; ours are [in, out].
"""

from typing import Mapping

import numpy as np

from t5x_lite import param_layout
from t5x_lite.hf import tree
from t5x_lite.models import bart
from t5x_lite.models import common

MODEL_CLS = bart.BartModel

_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu',
                'gelu_pytorch_tanh': 'gelu', 'relu': 'relu'}


def config_from_hf(hf_config: Mapping) -> bart.BartConfig:
  """Parsed `config.json` of a HF BART model directory -> BartConfig.

  Raises ValueError naming the setting when the checkpoint is not plain BART
  (mBART-style pre-norm, different encoder / decoder sizes, ...).
  """
  c = dict(hf_config)

  def reject(key, value, why):
    raise ValueError(f'HF config {key}={value!r}: {why}; only plain BART '
                     '(facebook/bart-*) checkpoints are supported.')

  if c.get('model_type', 'bart') != 'bart':
    reject('model_type', c['model_type'], 'not a BART model')
  for key, unsupported in (('normalize_before', True),
                           ('add_final_layer_norm', True),
                           ('normalize_embedding', False),
                           ('static_position_embeddings', True),
                           ('add_bias_logits', True),
                           ('tie_word_embeddings', False)):
    if c.get(key, not unsupported) == unsupported:
      reject(key, unsupported, 'this variant is not implemented')
  for key in ('encoder_layerdrop', 'decoder_layerdrop'):
    if c.get(key, 0.0):
      reject(key, c[key], 'LayerDrop is not implemented; set it to 0.0')
  pairs = (('encoder_attention_heads', 'decoder_attention_heads'),
           ('encoder_ffn_dim', 'decoder_ffn_dim'))
  for enc_key, dec_key in pairs:
    if c.get(enc_key) != c.get(dec_key):
      reject(dec_key, c.get(dec_key),
             f'differs from {enc_key}={c.get(enc_key)!r}; both stacks must '
             'have the same size')
  act = c.get('activation_function', 'gelu')
  if act not in _ACTIVATIONS:
    reject('activation_function', act, f'use one of {sorted(_ACTIVATIONS)}')
  d, heads = c.get('d_model', 1024), c.get('encoder_attention_heads', 16)
  if d % heads:
    reject('d_model', d, f'not divisible by {heads} attention heads')
  pad_id = c.get('pad_token_id')
  return bart.BartConfig(
      vocab_size=c['vocab_size'],
      emb_dim=d,
      num_heads=heads,
      head_dim=d // heads,
      mlp_dim=c.get('encoder_ffn_dim', 4096),
      num_encoder_layers=c.get('encoder_layers', 12),
      num_decoder_layers=c.get('decoder_layers', 12),
      max_positions=c.get('max_position_embeddings', 1024),
      pad_id=1 if pad_id is None else pad_id,
      decoder_start_id=c.get('decoder_start_token_id', 2),
      scale_embedding=bool(c.get('scale_embedding', False)),
      dropout_rate=c.get('dropout', 0.1),
      attention_dropout_rate=c.get('attention_dropout', 0.0),
      activation_dropout_rate=c.get('activation_dropout', 0.0),
      activation=_ACTIVATIONS[act],
      initializer_range=c.get('init_std', 0.02))


def config_to_hf(config: bart.BartConfig) -> dict:
  """BartConfig -> HF `BartForConditionalGeneration` config.json fields."""
  if config.num_heads * config.head_dim != config.emb_dim:
    raise ValueError(f'BART needs num_heads * head_dim == emb_dim; got {config.num_heads} * '
                     f'{config.head_dim} != {config.emb_dim}.')
  if config.position_offset != 2 or config.layer_norm_eps != 1e-5:
    raise ValueError('Hugging Face BART has position_offset=2 and layer_norm_eps=1e-5; '
                     f'this model has {config.position_offset} and {config.layer_norm_eps}.')
  names = {'gelu_exact': 'gelu', 'gelu': 'gelu_new', 'relu': 'relu'}
  return {
      'architectures': ['BartForConditionalGeneration'], 'model_type': 'bart',
      'vocab_size': config.vocab_size, 'd_model': config.emb_dim,
      'encoder_layers': config.num_encoder_layers, 'decoder_layers': config.num_decoder_layers,
      'encoder_attention_heads': config.num_heads, 'decoder_attention_heads': config.num_heads,
      'encoder_ffn_dim': config.mlp_dim, 'decoder_ffn_dim': config.mlp_dim,
      'max_position_embeddings': config.max_positions,
      'activation_function': names[config.activation], 'dropout': config.dropout_rate,
      'attention_dropout': config.attention_dropout_rate,
      'activation_dropout': config.activation_dropout_rate, 'init_std': config.initializer_range,
      'scale_embedding': bool(config.scale_embedding), 'encoder_layerdrop': 0.0,
      'decoder_layerdrop': 0.0, 'is_encoder_decoder': True, 'tie_word_embeddings': True,
      'pad_token_id': config.pad_id, 'decoder_start_token_id': config.decoder_start_id,
      'forced_eos_token_id': None, 'forced_bos_token_id': None}


def _module_map(config: bart.BartConfig) -> dict:
  """Our module path (tuple) -> HF module name (without `model.`)."""
  m = {}
  for stack, n in (('encoder', config.num_encoder_layers),
                   ('decoder', config.num_decoder_layers)):
    m[(stack, 'embedding_norm')] = f'{stack}.layernorm_embedding'
    for i in range(n):
      ours, hf = (stack, f'layers_{i}'), f'{stack}.layers.{i}'
      attention = [('self_attn', 'post_attention_layer_norm', 'attention')]
      if stack == 'decoder':
        attention = [
            ('self_attn', 'post_self_attention_layer_norm', 'self_attention'),
            ('encoder_attn', 'post_cross_attention_layer_norm',
             'encoder_decoder_attention')]
      for theirs, norm, name in attention:
        for proj, ours_proj in (('q_proj', 'query'), ('k_proj', 'key'),
                                ('v_proj', 'value'), ('out_proj', 'out')):
          m[ours + (name, ours_proj)] = f'{hf}.{theirs}.{proj}'
        m[ours + (norm,)] = f'{hf}.{theirs}_layer_norm'
      m[ours + ('mlp', 'wi')] = f'{hf}.fc1'
      m[ours + ('mlp', 'wo')] = f'{hf}.fc2'
      m[ours + ('post_mlp_layer_norm',)] = f'{hf}.final_layer_norm'
  return m


def _is_norm(path) -> bool:
  return path[-1].endswith('norm')


def _dense_shape(config: bart.BartConfig, path) -> tuple:
  """[in, out] of our dense kernel at `path`."""
  d, f = config.emb_dim, config.mlp_dim
  inner = config.num_heads * config.head_dim
  return {'query': (d, inner), 'key': (d, inner), 'value': (d, inner),
          'out': (inner, d), 'wi': (d, f), 'wo': (f, d)}[path[-1]]



def from_hf_state_dict(state_dict: Mapping[str, np.ndarray],
                       config: bart.BartConfig) -> dict:
  """HF `BartForConditionalGeneration` (or `BartModel`) state dict -> params.

  Returns our unboxed params tree (see `models/bart.py`). Raises KeyError
  naming missing tensors and ValueError on a shape mismatch (a config that
  does not fit the checkpoint) or on untied embeddings.
  """
  sd = {k[len('model.'):] if k.startswith('model.') else k: np.asarray(v)
        for k, v in state_dict.items()}
  dtype = np.dtype(config.param_dtype)

  get = tree.tensor_getter(sd, dtype, 'BART', 'BartForConditionalGeneration or BartModel',
                           'BartConfig')

  d, v = config.emb_dim, config.vocab_size
  rows = config.max_positions + config.position_offset
  shared = get('shared.weight', (v, d))
  for alias in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight',
                'lm_head.weight'):
    if alias in sd and not np.array_equal(sd[alias], sd['shared.weight']):
      raise ValueError(f'{alias} differs from model.shared.weight; BART here '
                       'ties token embeddings and the LM head.')
  bias = np.zeros((v,), dtype)
  if 'final_logits_bias' in sd:
    bias = get('final_logits_bias', (1, v))[0]
  params = {'token_embedder': {'embedding': shared},
            'final_logits_bias': bias}
  for stack in ('encoder', 'decoder'):
    tree.set_path(params, (stack, 'position_embedder', 'embedding'),
         get(f'{stack}.embed_positions.weight', (rows, d)))
  for path, hf in _module_map(config).items():
    if _is_norm(path):
      tree.set_path(params, path, {'scale': get(f'{hf}.weight', (d,)),
                          'bias': get(f'{hf}.bias', (d,))})
    else:
      n_in, n_out = _dense_shape(config, path)
      tree.set_path(params, path, {'kernel': get(f'{hf}.weight', (n_out, n_in)).T,
                          'bias': get(f'{hf}.bias', (n_out,))})
  return common.to_config_layout(params, config)  # stacked iff scan_layers


def to_hf_state_dict(params, config: bart.BartConfig) -> dict:
  """Our params -> HF `BartForConditionalGeneration` state dict (numpy)."""
  params = param_layout.unstack_layers(params)
  p = tree.flatten(params)
  shared = p[('token_embedder', 'embedding')]
  sd = {'model.shared.weight': shared,
        'model.encoder.embed_tokens.weight': shared,
        'model.decoder.embed_tokens.weight': shared,
        'lm_head.weight': shared,
        'final_logits_bias': p[('final_logits_bias',)][None]}
  for stack in ('encoder', 'decoder'):
    sd[f'model.{stack}.embed_positions.weight'] = p[
        (stack, 'position_embedder', 'embedding')]
  for path, hf in _module_map(config).items():
    if _is_norm(path):
      sd[f'model.{hf}.weight'] = p[path + ('scale',)]
      sd[f'model.{hf}.bias'] = p[path + ('bias',)]
    else:
      sd[f'model.{hf}.weight'] = p[path + ('kernel',)].T
      sd[f'model.{hf}.bias'] = p[path + ('bias',)]
  return sd
