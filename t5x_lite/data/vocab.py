"""Vocabularies: the embedded SentencePiece model and user-provided ones.

The embedded model (`vocab/embedded_8k.model`, built by
`python -m t5x_lite.data.build_vocab`) has 8000 pieces; seqio appends
`EXTRA_IDS` = 100 sentinels on top, so `vocab_size` is 8100 and
`<extra_id_0>` is id 8099, `<extra_id_1>` is 8098, ... exactly as in T5
(pad=0, eos=1, unk=2). A model's vocab size must be at least `vocab_size`.
"""

import functools
import os

import seqio

from t5x_lite.errors import UserError

EXTRA_IDS = 100
EMBEDDED_VOCAB_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'vocab', 'embedded_8k.model')


def sentencepiece_vocabulary(path, extra_ids=EXTRA_IDS):
  """A seqio SentencePiece vocabulary with `extra_ids` sentinels on top."""
  path = os.fspath(path)
  if not os.path.exists(path) and '://' not in path:
    raise UserError(
        f'SentencePiece model not found: {path}; pass the path of an existing '
        '.model file (or use the embedded vocabulary).')
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


@functools.cache
def embedded_vocabulary():
  """The vocabulary trained on the embedded corpus (8000 + 100 sentinels)."""
  if not os.path.exists(EMBEDDED_VOCAB_PATH):
    raise UserError(
        f'Embedded vocabulary missing at {EMBEDDED_VOCAB_PATH}; rebuild it with '
        '`python -m t5x_lite.data.build_vocab`.')
  return seqio.SentencePieceVocabulary(EMBEDDED_VOCAB_PATH, extra_ids=EXTRA_IDS)
