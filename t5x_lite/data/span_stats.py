"""Span-corruption statistics over random documents of the embedded corpus.

    python -m t5x_lite.data.span_stats [--num_docs 1000] [--seed 0]

Runs the `embedded_span_corruption` pipeline (tokenize, span corruption,
EOS) with lengths 512 / 114 on `num_docs` documents drawn at random from the
train split and prints, averaged over the resulting examples: the noise
fraction (noise tokens / original tokens), sentinels per example (inputs),
mean noise span length, and input / target fill (non-pad tokens, EOS
included, over 512 and 114). T5 expects a noise fraction near 0.15, ~28
sentinels and fills of 1.0 for full examples.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import corpus
from t5x_lite.data import preprocessors
from t5x_lite.data import vocab as vocab_lib

SEQUENCE_LENGTH = {'inputs': 512, 'targets': 114}


def corrupted_examples(docs, seed=0, sequence_length=None):
  """Span-corrupted examples (numpy dicts) of `docs`, as the task makes them."""
  sequence_length = sequence_length or SEQUENCE_LENGTH
  vocabulary = vocab_lib.embedded_vocabulary()
  output_features = {
      k: seqio.Feature(vocabulary=vocabulary, add_eos=True)
      for k in ('inputs', 'targets')}
  ds = tf.data.Dataset.from_tensor_slices({'targets': tf.constant(docs)})
  with seqio.utils.map_seed_manager(seed):
    ds = seqio.preprocessors.tokenize(ds, output_features)
    ds = preprocessors.span_corruption(ds, sequence_length, output_features)
    ds = seqio.preprocessors.append_eos_after_trim(
        ds, sequence_length=sequence_length, output_features=output_features)
  return list(ds.as_numpy_iterator())


def span_stats(examples, vocab_size, sequence_length=None):
  """Averages of the statistics described in the module docstring."""
  sequence_length = sequence_length or SEQUENCE_LENGTH
  first_sentinel = vocab_size - 100  # lowest sentinel id with 100 extra ids
  noise_fraction, sentinels, span_len, input_fill, target_fill = ([] for _ in
                                                                  range(5))
  for ex in examples:
    inputs, targets = ex['inputs'], ex['targets']
    in_sent = int(np.sum(inputs >= first_sentinel))
    tg_sent = int(np.sum(targets >= first_sentinel))
    noise = len(targets) - tg_sent - 1  # minus EOS
    original = noise + len(inputs) - in_sent - 1
    noise_fraction.append(noise / original)
    sentinels.append(in_sent)
    span_len.append(noise / max(in_sent, 1))
    input_fill.append(len(inputs) / sequence_length['inputs'])
    target_fill.append(len(targets) / sequence_length['targets'])
  full = [f == 1.0 for f in input_fill]
  return {
      'examples': len(examples),
      'full_length_examples': int(np.sum(full)),
      'noise_fraction': float(np.mean(noise_fraction)),
      'sentinels_per_example': float(np.mean(sentinels)),
      'mean_noise_span_length': float(np.mean(span_len)),
      'input_fill': float(np.mean(input_fill)),
      'target_fill': float(np.mean(target_fill)),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_docs', type=int, default=1000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  docs = corpus.split_documents('train')
  rng = np.random.default_rng(args.seed)
  picked = [docs[i] for i in rng.choice(len(docs), args.num_docs,
                                        replace=False)]
  examples = corrupted_examples(picked, seed=args.seed)
  stats = span_stats(examples, vocab_lib.embedded_vocabulary().vocab_size)
  print(f'span corruption over {args.num_docs} random documents of the '
        'embedded corpus (inputs 512, targets 114, noise density 0.15, mean '
        'span 3):')
  for key, value in stats.items():
    print(f'  {key:24s} {value:.4f}' if isinstance(value, float) else
          f'  {key:24s} {value}')


if __name__ == '__main__':
  main()
