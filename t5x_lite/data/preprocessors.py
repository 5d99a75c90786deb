"""T5's span corruption as seqio preprocessors.

Span corruption (Raffel et al., 2020, section 3.1.4) picks ~15% of the tokens
of a segment in spans of mean length 3, replaces each span in the inputs by a
unique sentinel and asks the model to emit the spans, each behind its
sentinel:

    original: The  cute dog walks in the park
    inputs:   The  <X> walks in <Y> park
    targets:  <X> cute dog <Y> the

Sentinels are the top ids of the vocabulary counted downward:
`<extra_id_0>` = vocab_size - 1, `<extra_id_1>` = vocab_size - 2, ...

The pipeline (same as the `t5` package's `span_corruption`):

1. `select_random_chunk`: one random chunk of at most 65536 tokens per document
   (from the 'targets' feature),
2. `reduce_concat_tokens`: concatenate 128 documents at a time (less padding),
3. `split_tokens`: cut into segments of the raw length given by
   `random_spans_helper`, so that after corruption the inputs (plus EOS) are
   exactly `sequence_length['inputs']` long and the targets (plus EOS) at most
   the returned targets length (512 inputs -> 568 raw tokens -> 114 targets),
4. `denoise`: noise mask from `random_spans_noise_mask`, inputs from
   `noise_span_to_unique_sentinel`, targets from
   `nonnoise_span_to_unique_sentinel`.

EOS is appended afterwards by `seqio.preprocessors.append_eos_after_trim`.
Randomness comes from seqio's stateless map seeds (`seqio.map_over_dataset`
with `num_seeds`), so `task.get_dataset(seed=s)` is deterministic in `s`.
"""

import functools

import seqio
import tensorflow as tf

from t5x_lite.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE


def _to_int(x):
  return tf.cast(x, tf.int32)


def _to_float(x):
  return tf.cast(x, tf.float32)


def sentinel_id(vocabulary):
  """Id of `<extra_id_0>`: the top of the vocabulary."""
  return vocabulary.vocab_size - 1


# ----------------------------------------------------------------------------
# Lengths and masks.


def random_spans_helper(inputs_length=512, noise_density=0.15,
                        mean_noise_span_length=3.0,
                        extra_tokens_per_span_inputs=1,
                        extra_tokens_per_span_targets=1):
  """Raw segment length whose corrupted inputs fill `inputs_length` exactly.

  Args:
    inputs_length: desired length of the inputs, EOS included.
    noise_density: fraction of tokens that are noise.
    mean_noise_span_length: mean length of a noise span.
    extra_tokens_per_span_inputs: sentinels per span in the inputs (1).
    extra_tokens_per_span_targets: sentinels per span in the targets (1).

  Returns:
    (tokens_length, targets_length): split segments to `tokens_length` tokens;
    targets are then `targets_length` long, EOS included. (512, .15, 3) gives
    (568, 114).
  """

  def lengths(tokens_length):
    num_noise = int(round(tokens_length * noise_density))
    num_nonnoise = tokens_length - num_noise
    num_spans = int(round(num_noise / mean_noise_span_length))
    # Inputs: non-noise tokens, a sentinel per span, EOS. Targets: the other
    # way round.
    return (num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1)

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = lengths(tokens_length)
  # As in T5: with density 0.5 make targets no longer than inputs.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segmentation(num_items, num_segments, seed):
  """Lengths of a random partition of `num_items` into non-empty segments."""
  first_in_segment = tf.pad(
      seqio.utils.stateless_shuffle(
          _to_int(tf.range(num_items - 1) < num_segments - 1), seed),
      [[1, 0]])
  segment_id = tf.cumsum(first_in_segment)
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length, noise_density, seeds,
                            mean_noise_span_length=3.0):
  """Boolean noise mask of `length` made of random spans (T5's).

  round(length * noise_density) noise tokens (at least 1, at most length - 1)
  in round(num_noise / mean_noise_span_length) spans (at least 1); noise and
  non-noise tokens are each randomly segmented into that many spans, which
  alternate starting with non-noise.

  Args:
    length: int scalar, number of tokens.
    noise_density: fraction of noise tokens.
    seeds: two stateless seeds (each an int32 pair).
    mean_noise_span_length: mean noise span length.

  Returns:
    bool Tensor of shape [length].
  """
  if noise_density == 0.0:
    return tf.zeros([length], tf.bool)
  orig_length = length
  length = tf.maximum(length, 2)  # avoid degeneracy
  num_noise = _to_int(tf.round(_to_float(length) * noise_density))
  num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
  num_spans = _to_int(tf.round(_to_float(num_noise) / mean_noise_span_length))
  num_spans = tf.maximum(num_spans, 1)
  num_nonnoise = length - num_noise

  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, seeds[1])
  interleaved = tf.reshape(
      tf.stack([nonnoise_lengths, noise_lengths], axis=1), [num_spans * 2])
  span_starts = tf.cumsum(interleaved)[:-1]
  span_start_indicator = tf.math.unsorted_segment_sum(
      tf.ones_like(span_starts), span_starts, length)
  span_num = tf.cumsum(span_start_indicator)
  is_noise = tf.equal(span_num % 2, 1)
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens, noise_mask, vocabulary, seeds=None):
  """Replaces each noise span by one sentinel, top id first."""
  del seeds
  prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
  later_noise = tf.logical_and(noise_mask, prev_is_noise)
  sentinel = (sentinel_id(vocabulary) + 1 -
              tf.cumsum(tf.cast(first_noise, tokens.dtype)))
  tokens = tf.where(first_noise, sentinel, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocabulary,
                                     seeds=None):
  """Replaces each non-noise span by one sentinel (the targets)."""
  return noise_span_to_unique_sentinel(
      tokens, tf.logical_not(noise_mask), vocabulary, seeds)


# ----------------------------------------------------------------------------
# Dataset stages.


def select_random_chunk(dataset, max_length=65536, feature_key='targets'):
  """Keeps one random chunk of at most `max_length` tokens per example."""

  def chunk(x, seed):
    tokens = x[feature_key]
    n = tf.shape(tokens)[0]
    num_segments = _to_int(
        tf.math.ceil(_to_float(n) / _to_float(max_length)))
    start = max_length * tf.random.stateless_uniform(
        [], seed, maxval=num_segments, dtype=tf.int32)
    end = tf.minimum(start + max_length, n)
    return {feature_key: tokens[start:end]}

  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
  return seqio.map_over_dataset(chunk, num_seeds=1)(dataset)


def reduce_concat_tokens(dataset, feature_key='targets', batch_size=128):
  """Concatenates `batch_size` consecutive examples into one token stream."""
  dataset = dataset.map(lambda x: {feature_key: x[feature_key]},
                        num_parallel_calls=AUTOTUNE)
  dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

  def concat(x):
    tokens = tf.reshape(x[feature_key], [-1])
    return {feature_key: tf.boolean_mask(tokens, tf.cast(tokens, tf.bool))}

  return dataset.map(concat, num_parallel_calls=AUTOTUNE)


def split_tokens(dataset, max_tokens_per_segment, feature_key='targets'):
  """Splits each example into segments of `max_tokens_per_segment` tokens.

  The last segment holds the remainder (it may be shorter).
  """
  length = max_tokens_per_segment

  def split(x):
    tokens = x[feature_key]
    n = tf.shape(tokens)[0]
    num_segments = _to_int(tf.math.ceil(_to_float(n) / _to_float(length)))
    padding = num_segments * length - n
    padded = tf.concat([tokens, tf.zeros([padding], tokens.dtype)], 0)
    lengths = tf.concat(
        [tf.repeat(length, num_segments - 1), [length - padding]], 0)
    return {feature_key: tf.reshape(padded, [-1, length])}, lengths

  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
  dataset = dataset.map(split, num_parallel_calls=AUTOTUNE).unbatch()
  return dataset.map(lambda x, n: {feature_key: x[feature_key][:n]},
                     num_parallel_calls=AUTOTUNE)


def denoise(dataset, vocabulary, noise_density, noise_mask_fn, inputs_fn,
            targets_fn, input_feature_key='inputs'):
  """Builds (inputs, targets) from 'targets' with a noise mask."""

  def corrupt(x, seeds):
    tokens = x['targets']
    noise_mask = noise_mask_fn(tf.size(tokens), noise_density, seeds=seeds[:2])
    return {
        input_feature_key: inputs_fn(tokens, noise_mask, vocabulary,
                                     seeds=seeds[2:4]),
        'targets': targets_fn(tokens, noise_mask, vocabulary,
                              seeds=seeds[4:6]),
    }

  return seqio.map_over_dataset(corrupt, num_seeds=6)(dataset)


def span_corruption(dataset, sequence_length, output_features,
                    mean_noise_span_length=3.0, noise_density=0.15,
                    input_feature_key='inputs',
                    merge_examples_to_reduce_padding=True,
                    reserved_for_packing=None):
  """T5's span-corruption objective (a seqio preprocessor).

  Expects tokenized 'targets'; returns {input_feature_key, 'targets'} without
  EOS (follow with `seqio.preprocessors.append_eos_after_trim`). Full-length
  examples then have exactly `sequence_length[input_feature_key]` input
  tokens and `random_spans_helper(...)[1]` target tokens.

  Args:
    dataset: tf.data.Dataset with a tokenized 'targets' feature.
    sequence_length: dict of feature lengths, e.g. {'inputs': 512,
      'targets': 114}.
    output_features: dict of seqio.Feature; the 'targets' vocabulary gives the
      sentinels.
    mean_noise_span_length: mean noise span length (3).
    noise_density: fraction of noise tokens (0.15).
    input_feature_key: name of the corrupted feature.
    merge_examples_to_reduce_padding: concatenate documents before splitting.
    reserved_for_packing: tokens of the inputs to leave free (for packing).

  Returns:
    The corrupted dataset.
  """
  inputs_length = sequence_length[input_feature_key]
  if reserved_for_packing:
    inputs_length -= reserved_for_packing
  tokens_length, targets_length = random_spans_helper(
      inputs_length, noise_density, mean_noise_span_length,
      extra_tokens_per_span_inputs=1, extra_tokens_per_span_targets=1)
  if sequence_length['targets'] < targets_length:
    raise UserError(
        f"Span corruption with inputs length {inputs_length} makes targets of "
        f"{targets_length} tokens but the targets length is "
        f"{sequence_length['targets']}; set TASK_FEATURE_LENGTHS['targets'] "
        f">= {targets_length}.")
  vocabulary = output_features['targets'].vocabulary
  if (input_feature_key in output_features and
      output_features[input_feature_key].vocabulary != vocabulary):
    raise UserError(
        f"Span corruption needs the same vocabulary for '{input_feature_key}' "
        "and 'targets'; give both output features one vocabulary.")

  ds = select_random_chunk(dataset, max_length=65536, feature_key='targets')
  if merge_examples_to_reduce_padding:
    ds = reduce_concat_tokens(ds, feature_key='targets', batch_size=128)
  ds = split_tokens(ds, tokens_length, feature_key='targets')
  return denoise(
      ds, vocabulary, noise_density,
      noise_mask_fn=functools.partial(
          random_spans_noise_mask,
          mean_noise_span_length=mean_noise_span_length),
      inputs_fn=noise_span_to_unique_sentinel,
      targets_fn=nonnoise_span_to_unique_sentinel,
      input_feature_key=input_feature_key)
