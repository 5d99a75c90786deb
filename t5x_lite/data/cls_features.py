"""Feature converters for sequence classification (BERT [CLS], GPT-1 [EXTRACT]).

Task features (the `_cls` tasks in tasks/glue_cls.py): `text_a` and optional
`text_b` (token ids, no EOS) and `label` (int, or float for regression). The
'inputs' task feature length is the model's sequence length; when A and B do
not fit, tokens are dropped from the end of the longer one first (BERT's
`_truncate_seq_pair`; ties drop from B).

  BERT:  [CLS] A [SEP] B [SEP]   -> input_tokens, segment_ids (0 up to and
         including the first [SEP], 1 after), attention_mask, label
  GPT-1: [START] A [DELIM] B [EXTRACT] -> decoder_input_tokens,
         decoder_attention_mask, extract_position (index of [EXTRACT]), label

Without B: `[CLS] A [SEP]` and `[START] A [EXTRACT]`. Rows are padded with 0
to the length. The GPT-1 ids are three reserved extra ids of a SentencePiece
vocabulary (default: the embedded BPE one): START = `<extra_id_99>`,
DELIM = `<extra_id_98>`, EXTRACT = `<extra_id_97>` (ids 8000, 8001, 8002 of
the embedded vocabulary). Examples are never packed.

`PreferenceBertFeatureConverter` frames each side of a preference pair as
`[CLS] prompt [SEP] response [SEP]` (a BERT reward model).
"""

from typing import Mapping, Optional, Sequence

import tensorflow as tf

from t5x_lite.data import feature_converters
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError


def truncate_pair_lengths(len_a: tf.Tensor, len_b: tf.Tensor, budget: int):
  """Lengths (a, b) that BERT's `_truncate_seq_pair` leaves for `budget` tokens."""
  half_fits = 2 * tf.minimum(len_a, len_b) <= budget
  fits = len_a + len_b <= budget
  new_a = tf.where(fits, len_a, tf.where(
      half_fits, tf.where(len_a <= len_b, len_a, budget - len_b), (budget + 1) // 2))
  new_b = tf.where(fits, len_b, tf.where(
      half_fits, tf.where(len_a <= len_b, budget - len_a, len_b), budget // 2))
  return new_a, new_b


def _pad(x: tf.Tensor, length: int) -> tf.Tensor:
  x = tf.pad(x, [[0, length - tf.shape(x)[0]]])
  return tf.ensure_shape(x, [length])


def _label(ex, num_classes: Optional[int]) -> tf.Tensor:
  """The label as int32 (float32 for scores); class ids checked against num_classes."""
  label = ex['label']
  if label.dtype.is_floating:
    return tf.cast(label, tf.float32)
  label = tf.cast(label, tf.int32)
  if num_classes and num_classes > 1:  # -1: an unlabelled (test) row
    tf.debugging.assert_less(
        label, num_classes,
        message=f'a label is outside 0..{num_classes - 1}: set the model\'s num_classes '
                'to the task\'s (t5x_lite.tasks.glue_cls.num_classes(task_name))')
  return label


def _frame(ex, length: int, first: int, middle: int, last: int):
  """(ids, segment ids) of `first A middle B last` (or `first A last`)."""
  a = tf.cast(ex['text_a'], tf.int32)
  one = lambda i: tf.constant([i], tf.int32)
  if 'text_b' not in ex:
    a = a[:length - 2]
    ids = tf.concat([one(first), a, one(last)], 0)
    return ids, tf.zeros_like(ids)
  b = tf.cast(ex['text_b'], tf.int32)
  len_a, len_b = truncate_pair_lengths(tf.size(a), tf.size(b), length - 3)
  part_a = tf.concat([one(first), a[:len_a], one(middle)], 0)
  part_b = tf.concat([b[:len_b], one(last)], 0)
  return (tf.concat([part_a, part_b], 0),
          tf.concat([tf.zeros_like(part_a), tf.ones_like(part_b)], 0))


def _check(pack: bool, task_feature_lengths: Mapping[str, int], minimum: int) -> int:
  if pack:
    raise UserError('classification examples are not packed; '
                    'set runs.Data.pack = False.')
  if 'inputs' not in task_feature_lengths:
    raise UserError("classification needs TASK_FEATURE_LENGTHS = {'inputs': N}; got "
                    f'{dict(task_feature_lengths)}.')
  length = task_feature_lengths['inputs']
  if length < minimum:
    raise UserError(f"TASK_FEATURE_LENGTHS['inputs'] = {length} is too short; "
                    f'use at least {minimum}.')
  return length


class BertClassificationFeatureConverter:
  """`[CLS] A [SEP] B [SEP]` rows for `models.classification.BertClassificationModel`.

  Args:
    pack: must be False.
    vocabulary: a `WordPieceVocabulary` giving [CLS] / [SEP] (default: the
      embedded one); or pass `cls_id` and `sep_id`.
    num_classes: when given (> 1), class ids >= it fail the pipeline.
  """

  def __init__(self, pack: bool = False, vocabulary=None,
               cls_id: Optional[int] = None, sep_id: Optional[int] = None,
               num_classes: Optional[int] = None):
    self.pack = pack
    self.num_classes = num_classes
    if cls_id is None or sep_id is None:
      vocabulary = vocabulary or wordpiece.embedded_wordpiece_vocabulary()
      cls_id, sep_id = vocabulary.cls_id, vocabulary.sep_id
    self.cls_id, self.sep_id = int(cls_id), int(sep_id)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    length = _check(self.pack, task_feature_lengths, 4)

    def convert(ex):
      ids, segments = _frame(ex, length, self.cls_id, self.sep_id, self.sep_id)
      return {'input_tokens': _pad(ids, length),
              'segment_ids': _pad(segments, length),
              'attention_mask': _pad(tf.ones_like(ids), length),
              'label': _label(ex, self.num_classes)}

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def gpt_special_ids(vocabulary=None) -> Sequence[int]:
  """(START, DELIM, EXTRACT) = ids of `<extra_id_99>`, `<extra_id_98>`, `<extra_id_97>`."""
  vocabulary = vocabulary or vocab_lib.embedded_bpe_vocabulary()
  if getattr(vocabulary, 'extra_ids', 0) < 100:
    raise UserError('GPT-1 classification reserves <extra_id_97..99> for [START] / '
                    '[DELIM] / [EXTRACT]; use a vocabulary with 100 extra ids or pass '
                    'special_ids=(start, delim, extract).')
  top = vocabulary.vocab_size - 1  # <extra_id_0>
  return top - 99, top - 98, top - 97


class GptClassificationFeatureConverter:
  """`[START] A [DELIM] B [EXTRACT]` rows for `GptClassificationModel`.

  Args:
    pack: must be False.
    vocabulary: a SentencePiece vocabulary with 100 extra ids (default: the
      embedded BPE one); or pass `special_ids` = (start, delim, extract).
    num_classes: when given (> 1), class ids >= it fail the pipeline.
  """

  def __init__(self, pack: bool = False, vocabulary=None,
               special_ids: Optional[Sequence[int]] = None,
               num_classes: Optional[int] = None):
    self.pack = pack
    self.num_classes = num_classes
    self.special_ids = tuple(int(i) for i in (special_ids or gpt_special_ids(vocabulary)))

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    length = _check(self.pack, task_feature_lengths, 4)
    start, delim, extract = self.special_ids

    def convert(ex):
      ids, _ = _frame(ex, length, start, delim, extract)
      return {'decoder_input_tokens': _pad(ids, length),
              'decoder_attention_mask': _pad(tf.ones_like(ids), length),
              'extract_position': tf.size(ids) - 1,
              'label': _label(ex, self.num_classes)}

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


class PreferenceBertFeatureConverter(feature_converters.PreferenceFeatureConverter):
  """Preference pairs → `[CLS] prompt [SEP] response [SEP]` rows per side (a
  BERT reward model, `models.reward.RewardModel`).

  Each side s has `s_input_tokens`, `s_segment_ids` (1 on the response) and
  `s_attention_mask`, of length inputs + targets (the longer text is cut
  first, as `_truncate_seq_pair`). Otherwise as `PreferenceFeatureConverter`
  (one response under 'targets' gives unprefixed features).

  Args:
    pack: must be False.
    vocabulary: a `WordPieceVocabulary` giving [CLS] / [SEP] (default: the
      embedded one); or pass `cls_id` and `sep_id`.
    **kwargs: of `PreferenceFeatureConverter`.
  """
  DECODER_ONLY = False

  def __init__(self, pack: bool = False, vocabulary=None, cls_id: Optional[int] = None,
               sep_id: Optional[int] = None, **kwargs):
    super().__init__(pack, **kwargs)
    if cls_id is None or sep_id is None:
      vocabulary = vocabulary or wordpiece.embedded_wordpiece_vocabulary()
      cls_id, sep_id = vocabulary.cls_id, vocabulary.sep_id
    self.cls_id, self.sep_id = int(cls_id), int(sep_id)

  def _side(self, ex, side, lengths):
    length = lengths['inputs'] + lengths['targets']
    ids, segments = _frame({'text_a': ex['inputs'], 'text_b': ex[side]}, length,
                           self.cls_id, self.sep_id, self.sep_id)
    return {'input_tokens': _pad(ids, length), 'segment_ids': _pad(segments, length),
            'attention_mask': _pad(tf.ones_like(ids), length)}
