"""Trains the embedded SentencePiece vocabulary on the embedded corpus.

    python -m t5x_lite.data.build_vocab [--output PATH]

A unigram model of 8000 pieces laid out like T5's vocabulary (pad=0, eos=1,
unk=2, no bos, 'nmt_nfkc' normalisation) plus byte fallback, trained on the
train split of `t5x_lite.data.corpus` with fixed settings, so rerunning it on
the same Python and sentencepiece versions gives the same model. seqio adds the
100 sentinels (`<extra_id_*>`) on top: see `t5x_lite.data.vocab`.
"""

import argparse
import io
import os
import time

import sentencepiece as spm

from t5x_lite.data import corpus

VOCAB_SIZE = 8000
SEED = 0
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'vocab', 'embedded_8k.model')

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


def training_sentences():
  """Non-empty lines of the train split (SentencePiece trains on lines)."""
  for doc in corpus.split_documents('train'):
    for line in doc.splitlines():
      line = line.strip()
      if line:
        yield line


def build(output=DEFAULT_OUTPUT):
  """Trains the model and writes it to `output` (a `.model` path)."""
  spm.set_random_generator_seed(SEED)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=training_sentences(), model_writer=model,
      **TRAINER_SETTINGS)
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  with open(output, 'wb') as f:
    f.write(model.getvalue())
  return output


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  start = time.time()
  path = build(args.output)
  print(f'wrote {path} ({os.path.getsize(path)} bytes) in '
        f'{time.time() - start:.1f}s')


if __name__ == '__main__':
  main()
