"""Feature converters for model families that seqio's converters do not cover.

A converter turns a task's features into the model's batch features at fixed
lengths: `converter(pack=...)(dataset, task_feature_lengths)`, as seqio's do.
"""

import io
from typing import Mapping, Optional

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
                      'set runs.Data.pack = False.')

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

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    """The model features' lengths (seqio's converter method), for shapes
    without data; their dtypes are int32 but for MODEL_FEATURE_DTYPES."""
    length = task_feature_lengths['inputs'] + task_feature_lengths['targets']
    names = ['decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
             'decoder_prompt_mask']
    if self.pack:
      names += ['decoder_segment_ids', 'decoder_positions']
    return {name: length for name in names}

  MODEL_FEATURE_DTYPES = {'decoder_loss_weights': 'float32'}


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

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    """seqio.EncDecFeatureConverter's model feature lengths."""
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.EncDecFeatureConverter(pack=self.pack).get_model_feature_lengths(
        task_feature_lengths)

  MODEL_FEATURE_DTYPES = WitFeatureConverter.MODEL_FEATURE_DTYPES


PREFERENCE_SIDES = ('chosen', 'rejected')


def _reference_lookup(path: str):
  """pair_key -> (reference chosen, rejected log-probs), from a cache file of
  `t5x_lite.precompute_reference` (sorted keys: a binary search, no table)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise UserError(f'no reference log-probs at REFERENCE_LOGPS_PATH={path}; write them '
                    'with `python -m t5x_lite.precompute_reference` and the same gin files, '
                    'or set REFERENCE_LOGPS_PATH = None to keep the reference model.')
  with tf.io.gfile.GFile(path, 'rb') as f:
    cache = np.load(io.BytesIO(f.read()))
    order = np.argsort(cache['pair_key'])
    keys = tf.constant(cache['pair_key'][order], tf.int64)
    values = tf.constant(np.stack([cache['chosen'], cache['rejected']], 1)[order], tf.float32)

  def lookup(key):
    i = tf.minimum(tf.searchsorted(keys, key[None])[0], tf.shape(keys)[0] - 1)
    check = tf.debugging.assert_equal(
        tf.gather(keys, i), key, message=f'a preference pair has no reference log-probs in '
        f'{path}: the data changed since they were written; run t5x_lite.precompute_reference '
        'again')
    with tf.control_dependencies([check]):
      return tf.gather(values, i)
  return lookup


class PreferenceFeatureConverter:
  """Preference pairs → two causal sequences per pair (decoder-only DPO).

  For each side s of `PREFERENCE_SIDES`, the prompt ('inputs') and the
  response (feature s, with its EOS) form ONE causal sequence of length
  inputs + targets: `s_decoder_input_tokens` (shifted right, BOS 0),
  `s_decoder_target_tokens` and `s_decoder_loss_weights` (1 on the response,
  0 on the prompt and padding: the response's log-prob is their weighted
  sum). Pairs are not packed. With `reference_logps_path` (a cache written
  by `t5x_lite.precompute_reference`) the features also carry
  `reference_chosen_logps` / `reference_rejected_logps`, looked up by the
  task's 'pair_key'; `keep_pair_key` passes that key on (int64, host only).
  A task's float 'margin' per pair (a reward model's) passes on as it is.

  An example with 'targets' and no responses (a prompt and ONE response, as
  infer and RL rollouts score them) gives one side's features, unprefixed.
  """
  DECODER_ONLY = True

  def __init__(self, pack: bool = False, reference_logps_path: Optional[str] = None,
               keep_pair_key: bool = False):
    if pack:
      raise UserError('preference pairs are not packed; set runs.Data.pack = False.')
    self.reference_logps_path = reference_logps_path
    self.keep_pair_key = keep_pair_key

  def _shared(self, ex, lengths):
    """Features both sides read (none: each side is its own sequence)."""
    del ex, lengths
    return {}

  def _side(self, ex, side, lengths):
    import seqio  # pylint: disable=g-import-not-at-top
    prompt, response = tf.cast(ex['inputs'], tf.int32), tf.cast(ex[side], tf.int32)
    length = lengths['inputs'] + lengths['targets']
    targets = _fit(tf.concat([prompt, response], 0), length)
    weights = _fit(tf.concat([tf.zeros_like(prompt, tf.float32),
                              tf.ones_like(response, tf.float32)], 0), length)
    inputs = seqio.utils.make_autoregressive_inputs(targets, bos_id=0)
    return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
            'decoder_loss_weights': weights}

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    lookup = self.reference_logps_path and _reference_lookup(self.reference_logps_path)

    def convert(ex):
      out = self._shared(ex, task_feature_lengths)
      if 'targets' in ex and PREFERENCE_SIDES[0] not in ex:  # one response
        return {**out, **self._side(ex, 'targets', task_feature_lengths)}
      if 'margin' in ex:
        out['margin'] = tf.cast(ex['margin'], tf.float32)
      for side in PREFERENCE_SIDES:
        out.update({f'{side}_{k}': v for k, v in self._side(ex, side, task_feature_lengths).items()})
      if lookup:
        values = lookup(ex['pair_key'])
        out['reference_chosen_logps'], out['reference_rejected_logps'] = values[0], values[1]
      if self.keep_pair_key:
        out['pair_key'] = ex['pair_key']
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


class PreferenceEncDecFeatureConverter(PreferenceFeatureConverter):
  """Preference pairs → encoder-decoder features (DPO of T5 / BART).

  The prompt is `encoder_input_tokens` (padded to 'inputs'), shared by both
  sides; each side s has `s_decoder_input_tokens` (the response shifted
  right, 0 first), `s_decoder_target_tokens` and `s_decoder_loss_weights`
  (1 on the response), padded to 'targets'. Otherwise as
  `PreferenceFeatureConverter`.
  """
  DECODER_ONLY = False

  def _shared(self, ex, lengths):
    return {'encoder_input_tokens': _fit(tf.cast(ex['inputs'], tf.int32), lengths['inputs'])}

  def _side(self, ex, side, lengths):
    import seqio  # pylint: disable=g-import-not-at-top
    response = tf.cast(ex[side], tf.int32)
    targets = _fit(response, lengths['targets'])
    return {'decoder_input_tokens': seqio.utils.make_autoregressive_inputs(targets, bos_id=0),
            'decoder_target_tokens': targets,
            'decoder_loss_weights': _fit(tf.ones_like(response, tf.float32), lengths['targets'])}


class PromptFeatureConverter:
  """Prompts for RL rollouts (`models.policy`): `prompt_tokens` (the task's
  'inputs', 0-padded to the 'inputs' length) and `prompt_length`. Other
  features are dropped; prompts are not packed.

  A prompt longer than the 'inputs' length (the task's features reach the
  converter uncut) is, by `long_prompts`: 'error', kept with its real length
  in `prompt_length`, so that the run stops in one line; 'skip', dropped (as
  TRL filters them); 'keep_end', cut to its last tokens (a dialogue's latest
  turns).
  """
  TRIM_OUTPUT_FEATURES = False
  LONG_PROMPTS = ('error', 'skip', 'keep_end')

  def __init__(self, pack: bool = False, long_prompts: str = 'error'):
    if pack:
      raise UserError('RL prompts are not packed; set runs.Data.pack = False.')
    if long_prompts not in self.LONG_PROMPTS:
      raise UserError(f'long_prompts={long_prompts!r} is unknown; use one of '
                      f'{", ".join(self.LONG_PROMPTS)}.')
    self.long_prompts = long_prompts

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    length = task_feature_lengths['inputs']
    if self.long_prompts == 'skip':
      ds = ds.filter(lambda ex: tf.size(ex['inputs']) <= length)

    def convert(ex):
      prompt = tf.cast(ex['inputs'], tf.int32)
      if self.long_prompts == 'keep_end':
        prompt = prompt[-length:]
      return {'prompt_tokens': _fit(prompt, length),
              'prompt_length': tf.size(prompt, out_type=tf.int32)}

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
