"""Hugging Face T5 / mT5 weights <-> t5x_lite `models.encoder_decoder` params.

Covers T5 v1.0 (`feed_forward_proj='relu'`, lm head tied to the embedding
with the decoder output scaled by d_model**-0.5), T5 v1.1 / Flan-T5 / mT5
(`'gated-gelu'`, HF's tanh GELU `gelu_new` = our 'gelu', own lm head) and
the other `[gated-]{relu,gelu,gelu_new,silu}` variants. Names follow
`T5ForConditionalGeneration`; HF linear weights are [out, in], ours [in, out];
HF's relative attention table is [buckets, heads], ours [heads, buckets].

Tying: HF configs say whether the decoder output is rescaled
(`scale_decoder_outputs` in transformers >= 5, else `tie_word_embeddings`);
that is our `logits_via_embedding`. Without it the logits come from
`decoder/logits_dense`, initialised from `lm_head.weight`, or from
`shared.weight` when the checkpoint has no separate lm head (transformers 5
saves tied heads once).
"""

from typing import Mapping

import numpy as np

from t5x_lite.hf import tree
from t5x_lite import layers
from t5x_lite import param_layout
from t5x_lite.models import common
from t5x_lite.models.encoder_decoder import EncoderDecoderModel, T5Config

MODEL_CLS = EncoderDecoderModel

# HF activation name (config `dense_act_fn`) -> ours (layers.GatedMlp).
_ACTIVATIONS = {'relu': 'relu', 'gelu': 'gelu_exact', 'gelu_new': 'gelu',
                'gelu_pytorch_tanh': 'gelu', 'gelu_fast': 'gelu', 'silu': 'silu',
                'swish': 'silu'}


def config_from_hf(hf_config: Mapping) -> T5Config:
  """HF T5 / mT5 `config.json` (a dict) -> T5Config (float32)."""
  c = dict(hf_config)
  proj = c.get('feed_forward_proj', 'relu')
  parts = proj.split('-')
  gated = parts[0] == 'gated'
  act = 'gelu_new' if proj == 'gated-gelu' else parts[-1]
  valid_form = len(parts) == 1 or (len(parts) == 2 and gated)
  if act not in _ACTIVATIONS or not valid_form:
    raise ValueError(f"feed_forward_proj={proj!r} is not supported; use one of "
                     "'[gated-]relu', '[gated-]gelu', '[gated-]gelu_new', "
                     "'[gated-]silu'.")
  eps = c.get('layer_norm_epsilon', 1e-6)
  if eps != 1e-6:
    raise ValueError(f'layer_norm_epsilon={eps} is not supported; our RMSNorm '
                     'uses 1e-6.')
  activations = (_ACTIVATIONS[act], 'linear') if gated else (_ACTIVATIONS[act],)
  scaled = c.get('scale_decoder_outputs', c.get('tie_word_embeddings', True))
  num_layers = c.get('num_layers', 6)
  return T5Config(
      vocab_size=c.get('vocab_size', 32128),
      emb_dim=c.get('d_model', 512),
      num_heads=c.get('num_heads', 8),
      head_dim=c.get('d_kv', 64),
      mlp_dim=c.get('d_ff', 2048),
      num_encoder_layers=num_layers,
      num_decoder_layers=c.get('num_decoder_layers') or num_layers,
      dropout_rate=float(c.get('dropout_rate', 0.1)),
      relative_attention_num_buckets=c.get(
          'relative_attention_num_buckets', 32),
      relative_attention_max_distance=c.get(
          'relative_attention_max_distance', 128),
      mlp_activations=activations,
      logits_via_embedding=bool(scaled))


# Our activation -> HF `feed_forward_proj` (ungated form; gated: 'gated-' + it).
_HF_ACTIVATIONS = {'relu': 'relu', 'gelu_exact': 'gelu', 'gelu': 'gelu_new', 'silu': 'silu'}


def config_to_hf(config: T5Config) -> dict:
  """T5Config -> HF `T5ForConditionalGeneration` config.json fields.

  An untied head (T5 v1.1) says `tie_word_embeddings: false`, which
  transformers reads as "do not rescale the decoder output"; the exported
  `lm_head.weight` differs from `shared.weight`, so it is not tied on load.
  """
  acts = tuple(config.mlp_activations)
  gated = len(acts) == 2 and acts[1] == 'linear'
  if acts[0] not in _HF_ACTIVATIONS or len(acts) > 2 or (len(acts) == 2 and not gated) or (
      gated and acts[0] == 'gelu_exact'):  # HF's 'gated-gelu' is the tanh form
    raise ValueError(f'mlp_activations={acts} has no Hugging Face T5 equivalent; '
                     "exportable: (act,) or (act, 'linear') with act in relu, gelu, silu "
                     "(and gelu_exact ungated).")
  proj = ('gated-' if gated else '') + _HF_ACTIVATIONS[acts[0]]
  return {
      'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
      'vocab_size': config.vocab_size, 'd_model': config.emb_dim, 'd_kv': config.head_dim,
      'd_ff': config.mlp_dim, 'num_heads': config.num_heads,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate, 'layer_norm_epsilon': 1e-6,
      'feed_forward_proj': 'gated-gelu' if proj == 'gated-gelu_new' else proj,
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'is_encoder_decoder': True, 'initializer_factor': 1.0,
      'pad_token_id': 0, 'eos_token_id': 1, 'decoder_start_token_id': 0}


def _mlp_names(config: T5Config):
  n = len(config.mlp_activations)
  return ['wi'] if n == 1 else [f'wi_{i}' for i in range(n)]


def _param_map(config: T5Config) -> list:
  """[(our path, HF name, our shape, transposed)] for all but the embedding
  and the lm head."""
  d, f = config.emb_dim, config.mlp_dim
  inner = config.num_heads * config.head_dim
  out = []

  def attention(ours, hf):
    for a, b in (('query', 'q'), ('key', 'k'), ('value', 'v')):
      out.append((ours + (a, 'kernel'), f'{hf}.{b}.weight', (d, inner), True))
    out.append((ours + ('out', 'kernel'), f'{hf}.o.weight', (inner, d), True))

  def norm(ours, hf):
    out.append((ours + ('scale',), f'{hf}.weight', (d,), False))

  def mlp(ours, hf):
    for name in _mlp_names(config):
      out.append((ours + (name, 'kernel'), f'{hf}.DenseReluDense.{name}.weight',
                  (d, f), True))
    out.append((ours + ('wo', 'kernel'), f'{hf}.DenseReluDense.wo.weight',
                (f, d), True))

  for stack, n in (('encoder', config.num_encoder_layers),
                   ('decoder', config.num_decoder_layers)):
    out.append(((stack, 'relpos_bias', 'rel_embedding'),
                f'{stack}.block.0.layer.0.SelfAttention.'
                'relative_attention_bias.weight',
                (config.num_heads, config.relative_attention_num_buckets),
                True))
    norm((stack, f'{stack}_norm'), f'{stack}.final_layer_norm')
    for i in range(n):
      ours, hf = (stack, f'layers_{i}'), f'{stack}.block.{i}.layer'
      if stack == 'encoder':
        norm(ours + ('pre_attention_layer_norm',), f'{hf}.0.layer_norm')
        attention(ours + ('attention',), f'{hf}.0.SelfAttention')
        norm(ours + ('pre_mlp_layer_norm',), f'{hf}.1.layer_norm')
        mlp(ours + ('mlp',), f'{hf}.1')
      else:
        norm(ours + ('pre_self_attention_layer_norm',), f'{hf}.0.layer_norm')
        attention(ours + ('self_attention',), f'{hf}.0.SelfAttention')
        norm(ours + ('pre_cross_attention_layer_norm',), f'{hf}.1.layer_norm')
        attention(ours + ('encoder_decoder_attention',),
                  f'{hf}.1.EncDecAttention')
        norm(ours + ('pre_mlp_layer_norm',), f'{hf}.2.layer_norm')
        mlp(ours + ('mlp',), f'{hf}.2')
  return out



def from_hf_state_dict(state_dict: Mapping[str, np.ndarray],
                       config: T5Config) -> dict:
  """HF `T5ForConditionalGeneration` state dict -> our (unboxed) params.

  Raises KeyError naming a missing tensor and ValueError on a shape that does
  not fit `config`.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  dtype = layers.canonicalize_dtype(config.param_dtype)

  get = tree.tensor_getter(sd, dtype, 'T5', 'T5ForConditionalGeneration / T5Model with this config',
                           'T5Config')

  v, d = config.vocab_size, config.emb_dim
  shared = next((k for k in ('shared.weight', 'encoder.embed_tokens.weight',
                             'decoder.embed_tokens.weight') if k in sd),
                'shared.weight')
  embedding = get(shared, (v, d))
  params = {'token_embedder': {'embedding': embedding}}
  for path, name, shape, transposed in _param_map(config):
    value = get(name, shape[::-1] if transposed else shape)
    tree.set_path(params, path, value.T if transposed else value)
  has_head = 'lm_head.weight' in sd
  if config.logits_via_embedding:
    if has_head and not np.array_equal(sd['lm_head.weight'], sd[shared]):
      raise ValueError('lm_head.weight differs from shared.weight but the '
                       'config scales decoder outputs for a tied head (T5 '
                       'v1.0); set tie_word_embeddings / scale_decoder_outputs '
                       'to false in config.json.')
  else:
    head = get('lm_head.weight', (v, d)) if has_head else embedding
    params['decoder']['logits_dense'] = {'kernel': head.T}
  return common.to_config_layout(params, config)  # stacked iff scan_layers



def to_hf_state_dict(params, config: T5Config) -> dict:
  """Our params -> HF `T5ForConditionalGeneration` state dict of numpy arrays.

  `lm_head.weight` is written only for an untied head (logits_dense).
  """
  params = param_layout.unstack_layers(params)
  p = tree.flatten(params)
  sd = {'shared.weight': p[('token_embedder', 'embedding')]}
  for path, name, _, transposed in _param_map(config):
    sd[name] = p[path].T if transposed else p[path]
  if not config.logits_via_embedding:
    sd['lm_head.weight'] = p[('decoder', 'logits_dense', 'kernel')].T
  return sd
