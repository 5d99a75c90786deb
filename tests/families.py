"""Tiny models of every family and random batches for them, shared by tests.

`tiny(name)` gives a model small enough that a step takes milliseconds, with
dropout off; `random_batch(model, rows)` gives a batch of every feature the
model reads, whose rows have different amounts of padding so that every mask
and every loss denominator matters.
"""

import numpy as np

from t5x_lite.models import bart, classification, decoder, encoder, encoder_decoder

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32)
# (input length, target length) of an encoder-decoder; one length otherwise.
LENGTHS = {'t5': (8, 6), 'bart': (8, 6)}
NAMES = ('t5', 'bert', 'gpt', 'gpt_scanned', 'bart', 'bert_cls', 'gpt_cls')


def _gpt(**kw):
  return decoder.GPTConfig(**SMALL, num_layers=2, max_positions=16, dropout_rate=0.0,
                           attention_dropout_rate=0.0, **kw)


def _bert():
  return encoder.BertConfig(**SMALL, num_layers=2, max_positions=16, dropout_rate=0.0,
                            attention_dropout_rate=0.0)


def tiny(name: str):
  """The tiny model of family `name` (one of NAMES)."""
  if name == 't5':
    return encoder_decoder.EncoderDecoderModel(encoder_decoder.T5Config(
        **SMALL, num_encoder_layers=2, num_decoder_layers=2))
  if name == 'bert':
    return encoder.EncoderModel(_bert())
  if name == 'gpt':
    return decoder.DecoderModel(_gpt())
  if name == 'gpt_scanned':
    return decoder.DecoderModel(_gpt(scan_layers=True, remat_policy='full'))
  if name == 'bart':
    return bart.BartModel(bart.BartConfig(
        **SMALL, num_encoder_layers=2, num_decoder_layers=2, max_positions=16,
        dropout_rate=0.0))
  if name == 'bert_cls':
    return classification.BertClassificationModel(_bert(), num_classes=3)
  if name == 'gpt_cls':
    return classification.GptClassificationModel(_gpt(), num_classes=3, lm_weight=0.5)
  raise ValueError(f'unknown family {name!r}; one of {NAMES}')


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
