"""Hugging Face BERT weights <-> t5x_lite `models.encoder` params.

Works on plain `{name: numpy array}` state dicts, so torch is not needed here:
with torch, `{k: v.numpy() for k, v in model.state_dict().items()}`; from a
directory, `t5x_lite.hf.io.read_state_dict(path)`. Names follow
`BertForPreTraining`; a leading `bert.` is optional. Checkpoints without some
heads load as in HF: `BertForMaskedLM` has no pooler and no next-sentence
head, `BertModel` has no MLM / NSP heads; a head that is absent altogether
is initialised fresh (normal(initializer_range) kernels, zero biases, unit
norms) with a warning naming it, so fine-tuning can start from the encoder.
HF stores linear weights as [out, in]; ours are [in, out].

`classifier_from_hf_state_dict` / `classifier_to_hf_state_dict` convert
`BertForSequenceClassification` (`classifier.{weight,bias}`) <->
`models.classification.BertClassificationModel` params (no pretraining heads).
"""

import logging
from typing import Mapping

import numpy as np

from t5x_lite import param_layout
from t5x_lite.hf import tree
from t5x_lite.models import common
from t5x_lite.models.encoder import BertConfig, EncoderModel

log = logging.getLogger(__name__)

MODEL_CLS = EncoderModel

# HF `hidden_act` -> ours (layers.activation_fn).
_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu',
                'gelu_pytorch_tanh': 'gelu', 'relu': 'relu', 'silu': 'silu',
                'swish': 'silu'}

# Heads a checkpoint may lack altogether: (name, HF tensor names).
_HEADS = (
    ('pooler', ('pooler.dense.weight', 'pooler.dense.bias')),
    ('MLM head', ('cls.predictions.transform.dense.weight',
                  'cls.predictions.transform.dense.bias',
                  'cls.predictions.transform.LayerNorm.weight',
                  'cls.predictions.transform.LayerNorm.bias',
                  'cls.predictions.bias')),
    ('next-sentence head', ('cls.seq_relationship.weight',
                            'cls.seq_relationship.bias')),
)


def config_from_hf(hf_config: Mapping) -> BertConfig:
  """HF BERT `config.json` (a dict) -> BertConfig (float32)."""
  c = dict(hf_config)
  position_type = c.get('position_embedding_type', 'absolute')
  if position_type != 'absolute':
    raise ValueError(f'position_embedding_type={position_type!r} is not '
                     "supported; only 'absolute' BERT checkpoints load.")
  act = c.get('hidden_act', 'gelu')
  if act not in _ACTIVATIONS:
    raise ValueError(f'hidden_act={act!r} is not supported; use one of '
                     f'{sorted(_ACTIVATIONS)}.')
  hidden, heads = c.get('hidden_size', 768), c.get('num_attention_heads', 12)
  if hidden % heads:
    raise ValueError(f'hidden_size={hidden} is not divisible by '
                     f'num_attention_heads={heads}.')
  return BertConfig(
      vocab_size=c.get('vocab_size', 30522),
      emb_dim=hidden,
      num_heads=heads,
      head_dim=hidden // heads,
      mlp_dim=c.get('intermediate_size', 3072),
      num_layers=c.get('num_hidden_layers', 12),
      max_positions=c.get('max_position_embeddings', 512),
      type_vocab_size=c.get('type_vocab_size', 2),
      dropout_rate=float(c.get('hidden_dropout_prob', 0.1)),
      attention_dropout_rate=float(c.get('attention_probs_dropout_prob', 0.1)),
      layer_norm_eps=float(c.get('layer_norm_eps', 1e-12)),
      activation=_ACTIVATIONS[act],
      initializer_range=float(c.get('initializer_range', 0.02)))


def config_to_hf(config: BertConfig) -> dict:
  """BertConfig -> HF BERT config.json fields (the architecture is the caller's)."""
  if config.num_heads * config.head_dim != config.emb_dim:
    raise ValueError(f'BERT needs num_heads * head_dim == emb_dim; got {config.num_heads} * '
                     f'{config.head_dim} != {config.emb_dim}.')
  names = {'gelu_exact': 'gelu', 'gelu': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}
  return {
      'model_type': 'bert', 'vocab_size': config.vocab_size, 'hidden_size': config.emb_dim,
      'num_attention_heads': config.num_heads, 'num_hidden_layers': config.num_layers,
      'intermediate_size': config.mlp_dim, 'hidden_act': names[config.activation],
      'max_position_embeddings': config.max_positions,
      'type_vocab_size': config.type_vocab_size,
      'hidden_dropout_prob': config.dropout_rate,
      'attention_probs_dropout_prob': config.attention_dropout_rate,
      'layer_norm_eps': config.layer_norm_eps, 'initializer_range': config.initializer_range,
      'position_embedding_type': 'absolute', 'pad_token_id': 0}


def _fresh_heads(sd: dict, config: BertConfig, heads=_HEADS) -> None:
  """Adds HF-style fresh tensors for heads absent from `sd`, with a warning."""
  d, v = config.emb_dim, config.vocab_size
  rng = np.random.default_rng(0)
  fresh = {'pooler.dense.weight': (d, d), 'pooler.dense.bias': (d,),
           'cls.predictions.transform.dense.weight': (d, d),
           'cls.predictions.transform.dense.bias': (d,),
           'cls.predictions.transform.LayerNorm.weight': (d,),
           'cls.predictions.transform.LayerNorm.bias': (d,),
           'cls.predictions.bias': (v,),
           'cls.seq_relationship.weight': (2, d),
           'cls.seq_relationship.bias': (2,)}
  for head, names in heads:
    if any(name in sd for name in names):
      continue
    for name in names:
      shape = fresh[name]
      if name.endswith('LayerNorm.weight'):
        sd[name] = np.ones(shape, np.float32)
      elif name.endswith('weight'):
        sd[name] = (config.initializer_range *
                    rng.standard_normal(shape)).astype(np.float32)
      else:
        sd[name] = np.zeros(shape, np.float32)
    log.warning('the BERT checkpoint has no %s; it is initialised fresh, as '
                'Hugging Face does: train it before relying on its outputs.',
                head)


def _layer_map(i: int) -> dict:
  """Our path (tuple) -> HF name, for encoder layer i."""
  ours, hf = ('encoder', f'layers_{i}'), f'encoder.layer.{i}'
  m = {}
  for name in ('query', 'key', 'value'):
    m[ours + ('attention', name)] = f'{hf}.attention.self.{name}'
  m[ours + ('attention', 'out')] = f'{hf}.attention.output.dense'
  m[ours + ('post_attention_layer_norm',)] = f'{hf}.attention.output.LayerNorm'
  m[ours + ('mlp', 'wi')] = f'{hf}.intermediate.dense'
  m[ours + ('mlp', 'wo')] = f'{hf}.output.dense'
  m[ours + ('post_mlp_layer_norm',)] = f'{hf}.output.LayerNorm'
  return m


def _module_map(config: BertConfig) -> dict:
  """Our module path -> (HF module name, kind) for dense / norm modules."""
  m = {('embedding_norm',): 'embeddings.LayerNorm', ('pooler',): 'pooler.dense'}
  for i in range(config.num_layers):
    m.update(_layer_map(i))
  return m



def from_hf_state_dict(state_dict: Mapping[str, np.ndarray],
                       config: BertConfig, pretraining_heads: bool = True) -> dict:
  """HF `BertForPreTraining` state dict -> our (unboxed) params pytree.

  Heads absent altogether are initialised fresh (see the module docstring);
  with `pretraining_heads=False` the MLM and NSP heads are left out.
  Raises KeyError naming missing tensors and ValueError on shape mismatch
  (e.g. a config that does not fit the checkpoint).
  """
  sd = {}  # cls.predictions.decoder.bias is HF's alias of cls.predictions.bias
  for k, v in state_dict.items():
    sd[k[len('bert.'):] if k.startswith('bert.') else k] = np.asarray(v)
  _fresh_heads(sd, config, _HEADS if pretraining_heads else _HEADS[:1])
  dtype = np.dtype(config.param_dtype)

  get = tree.tensor_getter(sd, dtype, 'BERT', 'BertForPreTraining, BertForMaskedLM or BertModel',
                           'BertConfig')

  d, v, f = config.emb_dim, config.vocab_size, config.mlp_dim
  inner = config.num_heads * config.head_dim
  params = {}
  for ours, theirs, rows in (
      ('token_embedder', 'word_embeddings', v),
      ('position_embedder', 'position_embeddings', config.max_positions),
      ('segment_embedder', 'token_type_embeddings', config.type_vocab_size)):
    params[ours] = {'embedding': get(f'embeddings.{theirs}.weight', (rows, d))}

  def dense_shape(path):
    last = path[-1]
    if last in ('query', 'key', 'value'):
      return (d, inner)
    return {'out': (inner, d), 'wi': (d, f), 'wo': (f, d)}.get(last, (d, d))

  for path, hf in _module_map(config).items():
    if 'LayerNorm' in hf:
      tree.set_path(params, path, {'scale': get(f'{hf}.weight', (d,)),
                          'bias': get(f'{hf}.bias', (d,))})
    else:
      n_in, n_out = dense_shape(path)
      tree.set_path(params, path, {'kernel': get(f'{hf}.weight', (n_out, n_in)).T,
                          'bias': get(f'{hf}.bias', (n_out,))})

  if not pretraining_heads:
    return common.to_config_layout(params, config)
  pred = 'cls.predictions'
  params['mlm_head'] = {
      'transform': {'kernel': get(f'{pred}.transform.dense.weight', (d, d)).T,
                    'bias': get(f'{pred}.transform.dense.bias', (d,))},
      'layer_norm': {'scale': get(f'{pred}.transform.LayerNorm.weight', (d,)),
                     'bias': get(f'{pred}.transform.LayerNorm.bias', (d,))},
      'output_bias': get(f'{pred}.bias', (v,)),
  }
  if f'{pred}.decoder.weight' in sd:
    tied = np.array_equal(sd[f'{pred}.decoder.weight'],
                          sd['embeddings.word_embeddings.weight'])
    if not tied:
      raise ValueError('cls.predictions.decoder.weight differs from the word '
                       'embeddings; our MLM head is tied to them.')
  params['nsp_head'] = {
      'kernel': get('cls.seq_relationship.weight', (2, d)).T,
      'bias': get('cls.seq_relationship.bias', (2,))}
  return common.to_config_layout(params, config)  # stacked iff scan_layers


def to_hf_state_dict(params, config: BertConfig) -> dict:
  """Our params -> HF `BertForPreTraining` state dict of numpy arrays."""
  params = param_layout.unstack_layers(params)
  p = tree.flatten(params)
  sd = {}
  for ours, theirs in (('token_embedder', 'word_embeddings'),
                       ('position_embedder', 'position_embeddings'),
                       ('segment_embedder', 'token_type_embeddings')):
    sd[f'bert.embeddings.{theirs}.weight'] = p[(ours, 'embedding')]
  for path, hf in _module_map(config).items():
    if 'LayerNorm' in hf:
      sd[f'bert.{hf}.weight'] = p[path + ('scale',)]
      sd[f'bert.{hf}.bias'] = p[path + ('bias',)]
    else:
      sd[f'bert.{hf}.weight'] = p[path + ('kernel',)].T
      sd[f'bert.{hf}.bias'] = p[path + ('bias',)]
  if ('mlm_head', 'output_bias') not in p:
    return sd
  head = ('mlm_head',)
  sd['cls.predictions.transform.dense.weight'] = p[head + ('transform', 'kernel')].T
  sd['cls.predictions.transform.dense.bias'] = p[head + ('transform', 'bias')]
  sd['cls.predictions.transform.LayerNorm.weight'] = p[head + ('layer_norm', 'scale')]
  sd['cls.predictions.transform.LayerNorm.bias'] = p[head + ('layer_norm', 'bias')]
  sd['cls.predictions.bias'] = p[head + ('output_bias',)]
  sd['cls.predictions.decoder.weight'] = sd['bert.embeddings.word_embeddings.weight']
  sd['cls.predictions.decoder.bias'] = sd['cls.predictions.bias']
  sd['cls.seq_relationship.weight'] = p[('nsp_head', 'kernel')].T
  sd['cls.seq_relationship.bias'] = p[('nsp_head', 'bias')]
  return sd


def classifier_from_hf_state_dict(state_dict: Mapping[str, np.ndarray],
                                  config: BertConfig) -> dict:
  """HF `BertForSequenceClassification` state dict -> BertClassificationModel params.

  The number of classes is that of `classifier.weight` [C, D].
  """
  if 'classifier.weight' not in state_dict:
    raise KeyError('the BERT checkpoint has no classifier.weight; it is not a '
                   'BertForSequenceClassification (load the encoder alone with '
                   'from_hf_state_dict and train a fresh head).')
  weight = np.asarray(state_dict['classifier.weight'])
  params = from_hf_state_dict(state_dict, config, pretraining_heads=False)
  params['classifier'] = {
      'kernel': weight.T.astype(config.param_dtype),
      'bias': np.asarray(state_dict['classifier.bias']).astype(config.param_dtype)}
  return params


def classifier_to_hf_state_dict(params, config: BertConfig) -> dict:
  """BertClassificationModel params -> HF `BertForSequenceClassification` state dict."""
  sd = to_hf_state_dict(params, config)
  sd['classifier.weight'] = np.asarray(params['classifier']['kernel']).T
  sd['classifier.bias'] = np.asarray(params['classifier']['bias'])
  return sd


def classification_model(config: BertConfig, state_dict: Mapping[str, np.ndarray]):
  """(BertClassificationModel, params) of a HF `BertForSequenceClassification`
  (one class: regression)."""
  from t5x_lite.models import classification  # pylint: disable=g-import-not-at-top
  params = classifier_from_hf_state_dict(state_dict, config)
  num_classes = params['classifier']['bias'].shape[0]
  return classification.BertClassificationModel(config, num_classes=num_classes), params


# HF `architectures` whose checkpoints load as another model than MODEL_CLS.
ARCHITECTURES = {'BertForSequenceClassification': classification_model}
