"""Trains the embedded SentencePiece vocabularies on the embedded corpus.

    python -m t5x_lite.data.build_vocab [--model_type unigram|bpe] [--output PATH]

- `unigram` (T5, BERT-free families; `vocab/embedded_8k.model`): 8000 pieces
  laid out like T5's vocabulary (pad=0, eos=1, unk=2, no bos, 'nmt_nfkc'
  normalisation) plus byte fallback.
- `bpe` (GPT, BART; `vocab/embedded_bpe_8k.model`): 8000 BPE pieces with
  the same special ids, NFKC normalisation only, whitespace kept (runs of
  spaces are pieces, newlines fall back to bytes), so decoding gives back the
  NFKC-normalised text, close to GPT-2's lossless byte-level BPE.

Both train on the lines of the train split of `t5x_lite.data.corpus` with
fixed settings, so rerunning on the same Python and sentencepiece versions
gives the same model. seqio adds the 100 extra ids (`<extra_id_*>`: T5's
sentinels, BART's mask) on top: see `t5x_lite.data.vocab`.
"""

if __name__ == '__main__':  # a run starts here: tune the host first
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare(tensorflow=False)

import argparse
import io
import os
import time

import sentencepiece as spm

from t5x_lite.data import corpus

VOCAB_SIZE = 8000
SEED = 0
_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vocab')
DEFAULT_OUTPUTS = {
    'unigram': os.path.join(_VOCAB_DIR, 'embedded_8k.model'),
    'bpe': os.path.join(_VOCAB_DIR, 'embedded_bpe_8k.model'),
}

TRAINER_SETTINGS = dict(
    model_type='unigram',
    vocab_size=VOCAB_SIZE,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    normalization_rule_name='nmt_nfkc',
    byte_fallback=True,
    character_coverage=0.9995,
    input_sentence_size=0,         # use every line, no sampling
    shuffle_input_sentence=False,  # deterministic
    max_sentence_length=8192,
    num_threads=2,
    minloglevel=2,
)
# Settings that differ for the BPE model.
BPE_SETTINGS = dict(
    model_type='bpe',
    normalization_rule_name='nfkc',
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
)


def training_sentences(strip=True):
  """Non-empty lines of the train split (SentencePiece trains on lines).

  `strip=False` keeps indentation and trailing spaces (the BPE model learns
  whitespace pieces from them).
  """
  for doc in corpus.split_documents('train'):
    for line in doc.splitlines():
      if line.strip():
        yield line.strip() if strip else line


def build(output=None, model_type='unigram'):
  """Trains the model and writes it to `output` (a `.model` path)."""
  output = output or DEFAULT_OUTPUTS[model_type]
  settings = dict(TRAINER_SETTINGS, **(BPE_SETTINGS if model_type == 'bpe' else {}))
  spm.set_random_generator_seed(SEED)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=training_sentences(strip=model_type != 'bpe'), model_writer=model,
      **settings)
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  with open(output, 'wb') as f:
    f.write(model.getvalue())
  return output


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_type', choices=sorted(DEFAULT_OUTPUTS), default='unigram')
  parser.add_argument('--output', default=None, help='default: the embedded model of that type')
  args = parser.parse_args(argv)
  start = time.time()
  path = build(args.output, args.model_type)
  print(f'wrote {path} ({os.path.getsize(path)} bytes) in '
        f'{time.time() - start:.1f}s')


if __name__ == '__main__':
  main()
