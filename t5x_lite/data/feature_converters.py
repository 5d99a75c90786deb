"""Feature converters for model families that seqio's converters do not cover.

A converter turns a task's features into the model's batch features at fixed
lengths: `converter(pack=...)(dataset, task_feature_lengths)`, as seqio's do.
"""

from typing import Mapping

import tensorflow as tf

from t5x_lite.errors import UserError


def _fit(x: tf.Tensor, length: int) -> tf.Tensor:
  """Trims or zero-pads a 1-D tensor to exactly `length`."""
  x = x[:length]
  x = tf.pad(x, [[0, length - tf.shape(x)[0]]])
  return tf.ensure_shape(x, [length])


class EncoderFeatureConverter:
  """BERT-style examples → encoder batch features, padded to the 'inputs' length.

  Task features: `inputs` (the corrupted tokens), `targets` (the originals),
  `loss_weights`, `segment_ids` and optionally `next_sentence_label`. Model
  features: `input_tokens`, `segment_ids`, `targets`, `loss_weights` and
  `next_sentence_label`. Examples are not packed (each is one sequence pair).
  """

  def __init__(self, pack: bool = False):
    if pack:
      raise UserError('encoder (BERT) examples are not packed; '
                      'set train_script.train.pack = False.')

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    length = task_feature_lengths['inputs']

    def convert(ex):
      out = {'input_tokens': _fit(ex['inputs'], length),
             'segment_ids': _fit(ex['segment_ids'], length),
             'targets': _fit(ex['targets'], length),
             'loss_weights': _fit(tf.cast(ex['loss_weights'], tf.float32), length)}
      if 'next_sentence_label' in ex:
        out['next_sentence_label'] = tf.cast(ex['next_sentence_label'], tf.int32)
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
