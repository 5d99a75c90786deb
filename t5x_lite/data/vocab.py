"""Vocabularies: the embedded SentencePiece model and user-provided ones.

The embedded model (`vocab/embedded_8k.model`, built by
`python -m t5x_lite.data.build_vocab`) has 8000 pieces; seqio appends
`EXTRA_IDS` = 100 sentinels on top, so `vocab_size` is 8100 and
`<extra_id_0>` is id 8099, `<extra_id_1>` is 8098, ... exactly as in T5
(pad=0, eos=1, unk=2). A model's vocab size must be at least `vocab_size`.

The embedded BPE model (`vocab/embedded_bpe_8k.model`, `--model_type bpe`)
has the same layout (8000 pieces + 100 extra ids, ids 0/1/2 as above) and
keeps whitespace, so decoding gives back the (NFKC-normalised) text; the GPT
and BART tasks use it (BART's [MASK] is `<extra_id_0>`, id 8099).

`hf_vocabulary(directory)` is a Hugging Face tokenizer directory
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`) as a vocabulary
with the tokenizer's own ids, eos and unk (see `hf_vocab`); `import_hf` binds
it in the model gin it writes:

    VOCABULARY = @vocab.hf_vocabulary()
    vocab.hf_vocabulary.directory = '/path/to/imported/tokenizer'
"""

import functools
import os

import seqio

from t5x_lite.data import hf_vocab
from t5x_lite.errors import UserError

EXTRA_IDS = 100
_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vocab')
EMBEDDED_VOCAB_PATH = os.path.join(_VOCAB_DIR, 'embedded_8k.model')
EMBEDDED_BPE_VOCAB_PATH = os.path.join(_VOCAB_DIR, 'embedded_bpe_8k.model')


def sentencepiece_vocabulary(path, extra_ids=EXTRA_IDS):
  """A seqio SentencePiece vocabulary with `extra_ids` sentinels on top."""
  path = os.fspath(path)
  if not os.path.exists(path) and '://' not in path:
    raise UserError(
        f'SentencePiece model not found: {path}; pass the path of an existing '
        '.model file (or use the embedded vocabulary).')
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def _embedded(path, model_type):
  if not os.path.exists(path):
    raise UserError(
        f'Embedded vocabulary missing at {path}; rebuild it with '
        f'`python -m t5x_lite.data.build_vocab --model_type {model_type}`.')
  return seqio.SentencePieceVocabulary(path, extra_ids=EXTRA_IDS)


@functools.cache
def embedded_vocabulary():
  """The unigram vocabulary trained on the embedded corpus (8000 + 100 sentinels)."""
  return _embedded(EMBEDDED_VOCAB_PATH, 'unigram')


@functools.cache
def embedded_bpe_vocabulary():
  """The BPE vocabulary trained on the embedded corpus (8000 + 100 extra ids)."""
  return _embedded(EMBEDDED_BPE_VOCAB_PATH, 'bpe')


def hf_vocabulary(directory):
  """The Hugging Face tokenizer in `directory` as a seqio vocabulary (one per
  directory); UserError naming the files sought if it has none."""
  return _hf_vocabulary(os.path.abspath(os.fspath(directory)))


@functools.cache
def _hf_vocabulary(directory):
  return hf_vocab.HfTokenizerVocabulary(directory)
