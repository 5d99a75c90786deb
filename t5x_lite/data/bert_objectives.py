"""BERT's pretraining objectives as seqio preprocessors: NSP pairs and MLM.

Pipeline (Devlin et al., 2019, section 3.1 and appendix A.1):

    {'text': document}  --nsp-->  {'inputs': [CLS] A [SEP] B [SEP],
                                   'segment_ids', 'next_sentence_label'}
                        --mlm-->  {'inputs': corrupted, 'targets': original,
                                   'loss_weights', 'segment_ids',
                                   'next_sentence_label'}

`nsp` (next-sentence pairs), a simpler documented version of BERT's
`create_instances_from_document`, one pair per document:

  * Sentences: a document's text is split at line breaks; each non-blank line
    is a "sentence" (the embedded corpus is wrapped docstrings, so lines are
    sentence-sized pieces). Lines are WordPiece-tokenized; empty ones dropped;
    documents with fewer than two are dropped.
  * A: k consecutive sentences starting at sentence s0, s0 uniform in
    [0, S-2] and k uniform in [1, S-1-s0] (so at least one sentence follows).
  * B: with probability 1/2 the true continuation (the sentences after A,
    label 0 = IsNext), otherwise the continuation segment of ANOTHER document
    of the same group of `pair_pool_size` documents (label 1 = NotNext).
    Labels follow Hugging Face's `BertForPreTraining`: 0 = IsNext,
    1 = NotNext.
  * A keeps its last `max_num_tokens` tokens and B its first (they stay
    adjacent), then `truncate_seq_pair` as in BERT: repeatedly drop one token
    from the longer of A and B (B on ties), from its front or back with
    probability 1/2 each, until len(A) + len(B) <= sequence_length['inputs'] -
    3. This is computed in closed form, not by a loop.
  * Output: `inputs` = [CLS] A [SEP] B [SEP], `segment_ids` 0 over
    [CLS] A [SEP] and 1 over B [SEP], `next_sentence_label`. BERT's
    `short_seq_prob` (10% of shorter targets) is not reproduced.

`mlm` (masked language modelling) over already framed `inputs`:

  * Candidates: every position whose token is not [CLS], [SEP], [PAD] or
    [MASK]. num_to_predict = min(max_predictions, max(1, round(n * mask_rate)))
    for n candidates (round half to even; none if n = 0), chosen uniformly
    without replacement, as BERT's `create_masked_lm_predictions`.
  * Each chosen position independently: [MASK] with probability
    `mask_token_rate` (0.8), a uniformly random non-special token with
    probability `random_token_rate` (0.1), unchanged otherwise (0.1).
  * Output: `inputs` corrupted, `targets` the original tokens (all
    positions), `loss_weights` 1.0 exactly at the chosen positions, 0.0
    elsewhere; every other feature (`segment_ids`, ...) passes through.

Randomness comes from seqio's stateless map seeds (`seqio.map_over_dataset`
with `num_seeds`), so `task.get_dataset(seed=s)` is deterministic in `s`. The
vocabulary must be a `t5x_lite.data.wordpiece.WordPieceVocabulary` (special
ids are looked up by token string).

    python -m t5x_lite.data.bert_objectives --stats

prints the MLM and NSP statistics over the embedded corpus.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.errors import UserError

IS_NEXT, NOT_NEXT = 0, 1


def _vocabulary(output_features, vocabulary, key='inputs'):
  vocabulary = vocabulary or output_features[key].vocabulary
  for attr in ('cls_id', 'sep_id', 'mask_id', 'special_ids'):
    if not hasattr(vocabulary, attr):
      raise UserError(
          f'BERT objectives need a WordPiece vocabulary with [CLS], [SEP] and '
          f'[MASK]; got {type(vocabulary).__name__} for feature {key!r}.')
  return vocabulary


def _uniform(shape, seed):
  return tf.random.stateless_uniform(shape, seed=seed)


# ----------------------------------------------------------------------------
# Masked language modelling.


def mlm_corrupt(tokens, vocabulary, seeds, mask_rate=0.15,
                mask_token_rate=0.8, random_token_rate=0.1,
                max_predictions=None):
  """BERT's masking of one sequence.

  Args:
    tokens: int32 [n] token ids (framed with [CLS]/[SEP]).
    vocabulary: a WordPieceVocabulary.
    seeds: three stateless seeds.
    mask_rate, mask_token_rate, random_token_rate, max_predictions: see `mlm`.

  Returns:
    (corrupted tokens, bool mask of the chosen positions), each [n].
  """
  tokens = tf.cast(tokens, tf.int32)
  n = tf.size(tokens)
  excluded = tf.constant(
      [vocabulary.cls_id, vocabulary.sep_id, vocabulary.pad_id,
       vocabulary.mask_id], tf.int32)
  candidate = tf.reduce_all(tokens[:, None] != excluded[None, :], axis=1)
  num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32))
  k = tf.cast(tf.round(tf.cast(num_candidates, tf.float32) * mask_rate),
              tf.int32)
  k = tf.minimum(tf.maximum(k, 1), num_candidates)
  if max_predictions is not None:
    k = tf.minimum(k, max_predictions)
  # Random scores; non-candidates sort last; the k smallest are chosen.
  scores = tf.where(candidate, _uniform([n], seeds[0]), 2.0)
  order = tf.argsort(scores, stable=True)
  rank = tf.math.invert_permutation(order)
  chosen = rank < k

  u = _uniform([n], seeds[1])
  to_mask = chosen & (u < mask_token_rate)
  to_random = chosen & (u >= mask_token_rate) & (
      u < mask_token_rate + random_token_rate)
  special = set(vocabulary.special_ids)
  pool = tf.constant(
      [i for i in range(vocabulary.vocab_size) if i not in special], tf.int32)
  random_tokens = tf.gather(pool, tf.random.stateless_uniform(
      [n], seed=seeds[2], maxval=tf.size(pool), dtype=tf.int32))
  corrupted = tf.where(to_mask, vocabulary.mask_id,
                       tf.where(to_random, random_tokens, tokens))
  return corrupted, chosen


def mlm(dataset, sequence_length, output_features, mask_rate=0.15,
        mask_token_rate=0.8, random_token_rate=0.1, max_predictions=None,
        feature_key='inputs', vocabulary=None):
  """BERT's masked-LM corruption of `feature_key` (see the module docstring).

  Args:
    dataset: examples with framed `inputs` (int ids) and usually
      `segment_ids`.
    sequence_length: unused (inputs are already at most their length).
    output_features: dict of seqio.Feature; the `feature_key` feature's
      vocabulary gives the special ids unless `vocabulary` is passed.
    mask_rate: fraction of the non-special tokens chosen for prediction.
    mask_token_rate: share of the chosen tokens replaced by [MASK].
    random_token_rate: share replaced by a random non-special token (the rest
      is kept).
    max_predictions: cap on chosen tokens per sequence (None: no cap; BERT
      uses 20 at length 128 and 80 at 512).
    feature_key: the feature to corrupt.
    vocabulary: a WordPieceVocabulary (default: the feature's).

  Returns:
    dataset with `inputs` corrupted, `targets` the original ids and float32
    `loss_weights` (1.0 at chosen positions); other features untouched.
  """
  del sequence_length
  if mask_token_rate + random_token_rate > 1.0:
    raise UserError(
        f'mlm: mask_token_rate + random_token_rate = '
        f'{mask_token_rate + random_token_rate} > 1; they are shares of the '
        'chosen tokens.')
  vocabulary = _vocabulary(output_features, vocabulary, feature_key)

  def corrupt(x, seeds):
    tokens = tf.cast(x[feature_key], tf.int32)
    corrupted, chosen = mlm_corrupt(
        tokens, vocabulary, seeds, mask_rate=mask_rate,
        mask_token_rate=mask_token_rate, random_token_rate=random_token_rate,
        max_predictions=max_predictions)
    x = dict(x)
    x[feature_key] = corrupted
    x['targets'] = tokens
    x['loss_weights'] = tf.cast(chosen, tf.float32)
    return x

  return seqio.map_over_dataset(corrupt, num_seeds=3)(dataset)


# ----------------------------------------------------------------------------
# Next-sentence prediction.


def truncated_lengths(len_a, len_b, max_num_tokens):
  """Lengths of A and B after BERT's `truncate_seq_pair`, in closed form.

  The longer of the two (B on ties) loses one token at a time until
  len_a + len_b <= max_num_tokens: first the longer shrinks to the shorter,
  then they alternate, B first.
  """
  excess = tf.maximum(len_a + len_b - max_num_tokens, 0)
  a_longer = len_a > len_b
  diff = tf.abs(len_a - len_b)
  r = tf.maximum(excess - diff, 0)
  shorter = tf.minimum(len_a, len_b)
  # Only one side shrinks when the difference absorbs the excess.
  a1 = tf.where(a_longer, len_a - excess, len_a)
  b1 = tf.where(a_longer, len_b, len_b - excess)
  # Otherwise both end near the shorter length; B loses the odd token.
  a2 = shorter - r // 2
  b2 = shorter - (r - r // 2)
  one_side = diff >= excess
  return tf.where(one_side, a1, a2), tf.where(one_side, b1, b2)


def truncate_seq_pair(a, b, max_num_tokens, seed):
  """BERT's `truncate_seq_pair`: drops from the front or back at random."""
  len_a, len_b = tf.size(a), tf.size(b)
  new_a, new_b = truncated_lengths(len_a, len_b, max_num_tokens)
  drop_a, drop_b = len_a - new_a, len_b - new_b
  u = _uniform([len_a + len_b], seed)
  front_a = tf.reduce_sum(tf.cast(u[:drop_a] < 0.5, tf.int32))
  front_b = tf.reduce_sum(tf.cast(u[len_a:len_a + drop_b] < 0.5, tf.int32))
  return a[front_a:front_a + new_a], b[front_b:front_b + new_b]


def split_sentences(text):
  """A document's non-blank lines (the sentence rule of `nsp`)."""
  lines = tf.strings.split(text, '\n')
  lines = tf.strings.strip(lines)
  return tf.boolean_mask(lines, tf.strings.length(lines) > 0)


def nsp(dataset, sequence_length, output_features, text_key='text',
        pair_pool_size=16, is_next_rate=0.5, vocabulary=None):
  """BERT next-sentence pairs, one per document (see the module docstring).

  Args:
    dataset: examples with a string document under `text_key`.
    sequence_length: dict; `sequence_length['inputs']` bounds the pair,
      [CLS] and two [SEP]s included.
    output_features: dict of seqio.Feature; the 'inputs' vocabulary (a
      WordPieceVocabulary) tokenizes, unless `vocabulary` is passed.
    text_key: the document feature.
    pair_pool_size: documents grouped together; a NotNext B comes from
      another document of the same group.
    is_next_rate: probability of the true continuation (label 0).
    vocabulary: a WordPieceVocabulary (default: the 'inputs' feature's).

  Returns:
    dataset of {'inputs', 'segment_ids', 'next_sentence_label'} (int32).
  """
  vocabulary = _vocabulary(output_features, vocabulary, 'inputs')
  length = sequence_length['inputs']
  max_num_tokens = length - 3
  if max_num_tokens < 2:
    raise UserError(
        f"nsp: sequence_length['inputs'] = {length} is too short; it needs "
        'room for [CLS] A [SEP] B [SEP] (at least 5).')

  def segments(x, seeds):
    sentences = vocabulary.encode_tf(split_sentences(x[text_key]))
    sentences = tf.ragged.boolean_mask(sentences, sentences.row_lengths() > 0)
    num = sentences.nrows(out_type=tf.int32)
    safe = tf.maximum(num, 2)
    s0 = tf.random.stateless_uniform([], seed=seeds[0], maxval=safe - 1,
                                     dtype=tf.int32)
    k = 1 + tf.random.stateless_uniform([], seed=seeds[1],
                                        maxval=safe - 1 - s0, dtype=tf.int32)
    a = sentences[s0:s0 + k].flat_values
    b = sentences[s0 + k:].flat_values
    return {'a': a[tf.maximum(tf.size(a) - max_num_tokens, 0):],
            'b': b[:max_num_tokens], 'num_sentences': num}

  def pair_up(batch, seeds):
    n = tf.shape(batch['num_sentences'])[0]
    is_next = _uniform([n], seeds[0]) < is_next_rate
    is_next = is_next | (n < 2)
    offset = 1 + tf.random.stateless_uniform(
        [n], seed=seeds[1], maxval=tf.maximum(n - 1, 1), dtype=tf.int32)
    other = (tf.range(n) + offset) % n
    b = tf.gather(batch['b'], tf.where(is_next, tf.range(n), other))
    return {'a': batch['a'], 'b': b,
            'next_sentence_label': tf.where(is_next, IS_NEXT, NOT_NEXT)}

  def frame(x, seed):
    a, b = truncate_seq_pair(x['a'], x['b'], max_num_tokens, seed)
    cls = tf.constant([vocabulary.cls_id], tf.int32)
    sep = tf.constant([vocabulary.sep_id], tf.int32)
    inputs = tf.concat([cls, a, sep, b, sep], axis=0)
    segment_ids = tf.concat([tf.zeros([tf.size(a) + 2], tf.int32),
                             tf.ones([tf.size(b) + 1], tf.int32)], axis=0)
    return {'inputs': inputs, 'segment_ids': segment_ids,
            'next_sentence_label': tf.cast(x['next_sentence_label'],
                                           tf.int32)}

  ds = seqio.map_over_dataset(segments, num_seeds=2)(dataset)
  ds = ds.filter(lambda x: x['num_sentences'] >= 2)
  ds = ds.map(lambda x: {'a': x['a'], 'b': x['b'],
                         'num_sentences': x['num_sentences']})
  ds = ds.ragged_batch(pair_pool_size)
  ds = seqio.map_over_dataset(pair_up, num_seeds=2)(ds)
  ds = ds.unbatch()
  return seqio.map_over_dataset(frame, num_seeds=1)(ds)


# ----------------------------------------------------------------------------
# Statistics over the embedded corpus.


def _features(vocabulary):
  return {k: seqio.Feature(vocabulary=vocabulary, add_eos=False)
          for k in ('inputs', 'targets')}


def bert_examples(num_sequences=10_000, inputs_length=128, seed=0,
                  max_predictions=None):
  """NSP + MLM examples (numpy dicts) from the embedded train split.

  The corpus is passed over as often as needed (seed + epoch per pass).
  """
  from t5x_lite.data import corpus  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import wordpiece  # pylint: disable=g-import-not-at-top
  vocabulary = wordpiece.embedded_wordpiece_vocabulary()
  features = _features(vocabulary)
  docs = corpus.split_documents('train')
  out = []
  epoch = 0
  while len(out) < num_sequences:
    ds = tf.data.Dataset.from_tensor_slices({'text': tf.constant(docs)})
    with seqio.utils.map_seed_manager(seed + epoch):
      ds = nsp(ds, {'inputs': inputs_length}, features)
      ds = mlm(ds, {'inputs': inputs_length}, features,
               max_predictions=max_predictions)
    out.extend(ds.take(num_sequences - len(out)).as_numpy_iterator())
    epoch += 1
  return out, vocabulary


def statistics(examples, vocabulary):
  """MLM / NSP figures of `examples` (a list of numpy dicts)."""
  specials = np.array([vocabulary.cls_id, vocabulary.sep_id,
                       vocabulary.pad_id, vocabulary.mask_id])
  candidates = selected = masked = replaced = kept = 0
  is_next = tokens = 0
  for x in examples:
    chosen = x['loss_weights'] > 0
    candidates += int(np.sum(~np.isin(x['targets'], specials)))
    selected += int(chosen.sum())
    masked += int(np.sum(chosen & (x['inputs'] == vocabulary.mask_id)))
    same = x['inputs'] == x['targets']
    kept += int(np.sum(chosen & same))
    replaced += int(np.sum(chosen & ~same &
                           (x['inputs'] != vocabulary.mask_id)))
    is_next += int(x['next_sentence_label'] == IS_NEXT)
    tokens += len(x['inputs'])
  return {
      'sequences': len(examples),
      'mean_length': tokens / max(len(examples), 1),
      'selected_fraction': selected / max(candidates, 1),
      'mask_share': masked / max(selected, 1),
      'random_share': replaced / max(selected, 1),
      'kept_share': kept / max(selected, 1),
      'is_next_share': is_next / max(len(examples), 1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stats', action='store_true',
                      help='print MLM / NSP statistics (the default action)')
  parser.add_argument('--num_sequences', type=int, default=10_000)
  parser.add_argument('--inputs_length', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  examples, vocabulary = bert_examples(args.num_sequences, args.inputs_length,
                                       args.seed)
  s = statistics(examples, vocabulary)
  print(f"sequences: {s['sequences']} (inputs length <= {args.inputs_length}, "
        f"mean {s['mean_length']:.1f} tokens)")
  print(f"MLM selected fraction of non-special tokens: "
        f"{s['selected_fraction']:.4f} (BERT: 0.15)")
  print(f"MLM shares of selected: [MASK] {s['mask_share']:.4f}, random "
        f"{s['random_share']:.4f}, kept {s['kept_share']:.4f} "
        '(BERT: 0.8 / 0.1 / 0.1; a random token equal to the original counts '
        'as kept)')
  print(f"NSP IsNext share (label 0): {s['is_next_share']:.4f} (BERT: 0.5)")


if __name__ == '__main__':
  main()
