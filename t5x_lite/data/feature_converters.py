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


class WitFeatureConverter:
  """Instruction examples → one causal sequence per example, with WIT loss weights.

  Weighted instruction tuning (WIT) of a decoder-only model: the prompt
  ('inputs') and the response ('targets', with its EOS) are concatenated into
  ONE causally attended sequence (no bidirectional prefix), of length
  inputs + targets. Loss weights are `prompt_weight` (λp) on prompt tokens
  and `response_weight` (λr) on response tokens, 0 on padding. Model
  features: `decoder_input_tokens` (shifted right, BOS 0; 0 at each packed
  segment start), `decoder_target_tokens`, float `decoder_loss_weights`,
  `decoder_prompt_mask` (1 over BOS and the prompt: what generation may see;
  the network does not read it) and, when packed, `decoder_segment_ids` /
  `decoder_positions`. Normalise with the model's
  loss_normalizing_factor='NUM_WEIGHTED_TOKENS' for the WIT loss.
  """
  DECODER_ONLY = True

  def __init__(self, pack: bool = False, prompt_weight: float = 0.1,
               response_weight: float = 0.9):
    if prompt_weight < 0 or response_weight < 0 or prompt_weight == response_weight == 0:
      raise UserError(f'WIT loss weights prompt_weight={prompt_weight}, response_weight='
                      f'{response_weight}: both must be >= 0 and not both 0; set '
                      'PROMPT_LOSS_WEIGHT / RESPONSE_LOSS_WEIGHT.')
    self.pack = pack
    self.prompt_weight = float(prompt_weight)
    self.response_weight = float(response_weight)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    import seqio  # pylint: disable=g-import-not-at-top
    length = task_feature_lengths['inputs'] + task_feature_lengths['targets']

    def concat(ex):
      inputs, targets = tf.cast(ex['inputs'], tf.int32), tf.cast(ex['targets'], tf.int32)
      # role: 1 prompt, 2 response (0 becomes padding).
      role = tf.concat([tf.ones_like(inputs), 2 * tf.ones_like(targets)], 0)
      return {'targets': tf.concat([inputs, targets], 0), 'role': role}

    ds = ds.map(concat, num_parallel_calls=tf.data.AUTOTUNE)
    lengths = {'targets': length, 'role': length}
    if self.pack:
      ds = seqio.utils.trim_and_pack_dataset(ds, lengths)
    else:
      ds = seqio.utils.trim_and_pad_dataset(ds, lengths)
    prompt_weight, response_weight = self.prompt_weight, self.response_weight

    def convert(ex):
      targets, role = ex['targets'], ex['role']
      segments = ex.get('targets_segment_ids')
      inputs = seqio.utils.make_autoregressive_inputs(targets, sequence_id=segments, bos_id=0)
      weights = tf.where(role == 2, response_weight, tf.where(role == 1, prompt_weight, 0.0))
      # BOS and the prompt; rows of one packed segment each (unpacked use only).
      prompt_mask = tf.concat([[1], tf.cast(role[:-1] == 1, tf.int32)], 0)
      out = {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
             'decoder_loss_weights': tf.ensure_shape(weights, [length]),
             'decoder_prompt_mask': prompt_mask}
      if self.pack:
        out['decoder_segment_ids'] = segments
        out['decoder_positions'] = ex['targets_positions']
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


class WitEncDecFeatureConverter:
  """Instruction examples → encoder-decoder features with the response loss × λr.

  `seqio.EncDecFeatureConverter`'s features (prompt → encoder, response →
  decoder) with `decoder_loss_weights` = `response_weight` (λr) on response
  tokens. The prompt is the encoder's input and carries no decoder loss, so a
  non-zero `prompt_weight` (λp) is an error.
  """

  def __init__(self, pack: bool = False, prompt_weight: float = 0.0,
               response_weight: float = 0.9):
    if prompt_weight:
      raise UserError(f'PROMPT_LOSS_WEIGHT={prompt_weight} has no meaning for an '
                      'encoder-decoder model: the prompt is encoded, not predicted; set '
                      'PROMPT_LOSS_WEIGHT = 0.0 (or use a decoder-only model).')
    if response_weight <= 0:
      raise UserError(f'RESPONSE_LOSS_WEIGHT={response_weight} must be > 0.')
    self.pack = pack
    self.response_weight = float(response_weight)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    import seqio  # pylint: disable=g-import-not-at-top
    ds = seqio.EncDecFeatureConverter(pack=self.pack)(ds, task_feature_lengths)
    weight = self.response_weight

    def scale(ex):
      return dict(ex, decoder_loss_weights=tf.cast(ex['decoder_loss_weights'], tf.float32) * weight)

    return ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
