"""Language-modelling preprocessors: causal LM, prefix LM and document chunks.

All take tokenized examples with a 'targets' feature (int32, no EOS yet).

- `causal_lm` (GPT): documents are ended with EOS (GPT-2's <|endoftext|>),
  concatenated into one stream and cut into chunks of exactly
  `sequence_length['targets']` tokens (the stream's last chunk may be shorter).
  Output features should have `add_eos=False`: the EOS is already in the stream.
- `prefix_lm` (T5's `prefix_lm` objective for decoder-only models):
  documents are concatenated and cut into chunks of
  n = max(inputs, targets) - 1 tokens; each chunk is split at a uniformly
  random point k into 'inputs' = chunk[:k] and 'targets' = chunk[k:], with k
  drawn so that both sides fit their lengths after EOS. seqio's
  `PrefixLMFeatureConverter` then gives the prefix bidirectional attention and
  puts the loss on the continuation only.
- `split_documents` (BART): each document on its own, cut into pieces of at
  most `sequence_length['targets'] - 1` tokens (room for EOS); no
  concatenation, so a noising scheme sees one document's sentences.

Randomness comes from seqio's stateless map seeds, so
`task.get_dataset(seed=s)` is deterministic in `s`.
"""

import seqio
import tensorflow as tf

from t5x_lite.data import preprocessors

AUTOTUNE = tf.data.AUTOTUNE


def _eos_id(output_features):
  return output_features['targets'].vocabulary.eos_id


def causal_lm(dataset, sequence_length, output_features):
  """Documents + EOS, concatenated, cut into `targets`-long chunks."""
  eos = _eos_id(output_features)
  dataset = dataset.filter(lambda x: tf.size(x['targets']) > 0)
  dataset = dataset.map(
      lambda x: {'targets': tf.concat([x['targets'], [eos]], 0)},
      num_parallel_calls=AUTOTUNE)
  dataset = preprocessors.reduce_concat_tokens(dataset, batch_size=128)
  return preprocessors.split_tokens(dataset, sequence_length['targets'])


def prefix_split_bounds(n, inputs_length, targets_length):
  """Range [lo, hi] of split points k for a chunk of n tokens (EOS added later)."""
  lo = tf.maximum(1, n - (targets_length - 1))
  hi = tf.minimum(inputs_length - 1, n - 1)
  return lo, hi


def prefix_lm(dataset, sequence_length, output_features):
  """Chunks of max(inputs, targets) - 1 tokens split at a random point."""
  del output_features
  inputs_length, targets_length = sequence_length['inputs'], sequence_length['targets']
  dataset = preprocessors.reduce_concat_tokens(dataset, batch_size=128)
  dataset = preprocessors.split_tokens(dataset, max(inputs_length, targets_length) - 1)
  dataset = dataset.filter(lambda x: tf.size(x['targets']) > 1)

  def split(x, seed):
    tokens = x['targets']
    lo, hi = prefix_split_bounds(tf.size(tokens), inputs_length, targets_length)
    k = tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)
    return {'inputs': tokens[:k], 'targets': tokens[k:]}

  return seqio.map_over_dataset(split, num_seeds=1)(dataset)


def split_documents(dataset, sequence_length, output_features):
  """Each document cut into pieces of at most targets - 1 tokens."""
  del output_features
  return preprocessors.split_tokens(dataset, sequence_length['targets'] - 1)
