"""Tiny models of every family and random batches for them, shared by tests.

`tiny(name)` gives a model small enough that a step takes milliseconds, with
dropout off; `config(name, **overrides)` its config, where a test that needs
other sizes names only what differs; `random_batch(model, rows)` gives a batch
of every feature the model reads, whose rows have different amounts of padding
so that every mask and every loss denominator matters.
"""

import dataclasses

import numpy as np

from t5x_lite.models import bart, classification, decoder, encoder, encoder_decoder

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32)
# (input length, target length) of an encoder-decoder; one length otherwise.
LENGTHS = {'t5': (8, 6), 'bart': (8, 6)}
NAMES = ('t5', 'bert', 'gpt', 'gpt_scanned', 'bart', 'bert_cls', 'gpt_cls')
NO_DROPOUT = dict(dropout_rate=0.0, attention_dropout_rate=0.0)

# The config of each family's tiny model (a classifier's is its backbone's).
_CONFIGS = {
    't5': lambda: encoder_decoder.T5Config(
        **SMALL, num_encoder_layers=2, num_decoder_layers=2),
    'bert': lambda: encoder.BertConfig(**SMALL, num_layers=2, max_positions=16, **NO_DROPOUT),
    'gpt': lambda: decoder.GPTConfig(**SMALL, num_layers=2, max_positions=16, **NO_DROPOUT),
    'gpt_scanned': lambda: decoder.GPTConfig(
        **SMALL, num_layers=2, max_positions=16, **NO_DROPOUT, scan_layers=True,
        remat_policy='full'),
    'bart': lambda: bart.BartConfig(
        **SMALL, num_encoder_layers=2, num_decoder_layers=2, max_positions=16,
        dropout_rate=0.0),
}
_CONFIGS['bert_cls'] = _CONFIGS['bert']
_CONFIGS['gpt_cls'] = _CONFIGS['gpt']


def config(name: str, **overrides):
  """The config of family `name`'s tiny model, with `overrides` replaced
  (`num_layers` sets both stacks of an encoder-decoder)."""
  if name not in _CONFIGS:
    raise ValueError(f'unknown family {name!r}; one of {NAMES}')
  cfg = _CONFIGS[name]()
  if 'num_layers' in overrides and not hasattr(cfg, 'num_layers'):
    layers = overrides.pop('num_layers')
    overrides.update(num_encoder_layers=layers, num_decoder_layers=layers)
  return dataclasses.replace(cfg, **overrides)


def tiny(name: str, **overrides):
  """The tiny model of family `name` (one of NAMES); `overrides` change its
  config as in `config`."""
  cfg = config(name, **overrides)
  if name == 't5':
    return encoder_decoder.EncoderDecoderModel(cfg)
  if name == 'bert':
    return encoder.EncoderModel(cfg)
  if name in ('gpt', 'gpt_scanned'):
    return decoder.DecoderModel(cfg)
  if name == 'bart':
    return bart.BartModel(cfg)
  if name == 'bert_cls':
    return classification.BertClassificationModel(cfg, num_classes=3)
  return classification.GptClassificationModel(cfg, num_classes=3, lm_weight=0.5)


def random_batch(model, rows: int = 3, lengths=None, seed: int = 0) -> dict:
  """Random ids for every feature of `model.dummy_batch`; row i has its last
  i % 4 positions padded (id 0, weight 0), labels are random classes."""
  rng = np.random.RandomState(seed)
  name = {encoder_decoder.EncoderDecoderModel: 't5', bart.BartModel: 'bart'}.get(type(model))
  lengths = lengths or LENGTHS.get(name, (8,))
  batch = {}
  for key, value in model.dummy_batch(rows, *lengths).items():
    if 'segment' in key:
      batch[key] = np.zeros_like(value)
    elif value.ndim == 2:
      ids = rng.randint(2, VOCAB, value.shape).astype(value.dtype)
      for i in range(rows):
        if i % 4:
          ids[i, -(i % 4):] = 0
      batch[key] = ids if 'weights' not in key and 'mask' not in key else (
          (ids > 0).astype(value.dtype))
    elif 'label' in key:
      classes = 2 if 'next_sentence' in key else 3
      batch[key] = rng.randint(0, classes, value.shape).astype(value.dtype)
    else:
      batch[key] = value
  return batch
