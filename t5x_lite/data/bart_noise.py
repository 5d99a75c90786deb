"""BART's noising schemes as seqio preprocessors.

BART (Lewis et al., 2019, section 2.2) corrupts a document and trains an
encoder-decoder to reconstruct it. Each scheme here is a seqio preprocessor
over examples whose 'targets' feature is the original token ids (int32, no
EOS yet). It reads 'inputs' if the example has it, else 'targets', and writes
the noised tokens to 'inputs'; 'targets' stays the original. Schemes can
therefore be used alone or chained, and `bart_denoise` chains a list of them
in a fixed order. EOS is appended afterwards
(`seqio.preprocessors.append_eos_after_trim`).

    original:          A B C . D E . F G H .
    token_masking:     A [M] C . D E . F [M] H .
    token_deletion:    A C . D E . F H .
    text_infilling:    A [M] . D [M] E . F [M] H .        (spans of 2, 0, 1)
    sentence_perm.:    F G H . A B C . D E .
    document_rotation: E . F G H . A B C . D

Schemes (n = number of tokens of the document):

- `token_masking`: exactly round(n * mask_rate) positions, drawn uniformly
  without replacement, are replaced by the mask id.
- `token_deletion`: exactly round(n * delete_rate) positions, drawn uniformly
  without replacement, are removed; the remaining tokens keep their order.
- `text_infilling` (as fairseq's `DenoisingDataset` with
  `mask_length='span-poisson'`, `replace_length=1`, at the token level):
  1. M = round(n * mask_rate) tokens are to be masked.
  2. Span lengths are drawn i.i.d. from Poisson(poisson_lambda) until their
     sum reaches M; the last one is truncated so that the lengths sum to
     exactly M. Zero lengths are kept: a zero-length span inserts a [MASK]
     without removing anything.
  3. Spans never touch: between two spans there is at least one unmasked
     token (so every span leaves its own [MASK] and the input determines the
     number of spans). This needs k - 1 <= n - M for k spans; if more spans
     were drawn (only in very short documents), zero-length spans are dropped,
     the last drawn first. With mask_rate <= 0.5 the non-zero spans always
     fit.
  4. The spans are put in a random order, and the unmasked tokens are split
     into the k + 1 gaps around them uniformly at random among all layouts
     (a uniform weak composition of n - M - (k - 1) into k + 1 parts, plus one
     token in each of the k - 1 interior gaps).
  5. Each span, whatever its length, is replaced by one mask token.
  So the masked fraction is M / n (~mask_rate) and the drawn lengths are
  Poisson(lambda) draws: by Wald's identity, pooled over many documents, the
  mean of the drawn lengths, zeros included and before the last one is
  truncated, is lambda (3.0). The lengths actually used are shorter on
  average (M / k), because each document's last span is truncated: the
  shorter the documents, the larger the gap. For long documents the mean of
  the non-zero used lengths tends to E[Poisson(3) | > 0] = 3 / (1 - e^-3)
  ~= 3.16; on the embedded corpus (~75 tokens per document) `--stats` gives
  2.82 with zero-length spans and 2.96 without, 4.9% zero-length spans, a
  drawn mean of 3.00 and a masked fraction of 0.300.
  `record_spans=True` adds, for tests and statistics, the features
  'infilling_span_starts' (position in the scheme's input tokens),
  'infilling_span_lengths' (used lengths) and 'infilling_drawn_lengths'
  (all drawn lengths, the last one untruncated), spans in input order.
- `sentence_permutation`: the document is split into sentences, each ending
  with (and including) a token of `sentence_end_ids`; trailing tokens without
  an end token form a last sentence. The sentences are shuffled uniformly.
  By default `sentence_end_ids` are the ids of the vocabulary that decode to
  '.', '!' or '?' when encoding those marks (the embedded vocabulary: 259 '.',
  1379 '!', 66 '?').
- `document_rotation`: an index i is drawn uniformly from [0, n) and the
  document becomes tokens[i:] + tokens[:i] (i = 0 leaves it unchanged).

The mask id is `mask_id` if given; otherwise the 'targets' vocabulary's
`mask_id` attribute if it has one (not None); otherwise, for a vocabulary
with sentinels (extra_ids > 0, e.g. t5x_lite's embedded vocabulary, size
8100), the first sentinel `<extra_id_0>` = vocab_size - 1 (8099). Anything
else is an error.

Randomness comes from seqio's stateless map seeds (`seqio.map_over_dataset`
with `num_seeds`), so results are deterministic under
`seqio.utils.map_seed_manager(seed)` / `task.get_dataset(seed=seed)` and
differ across seeds. Empty and one-token documents pass through (a one-token
document can only be masked, deleted or, for infilling with a high rate,
replaced by a mask).

    python -m t5x_lite.data.bart_noise --stats [--num_docs 10000] [--seed 0]

prints text-infilling statistics over documents of the embedded corpus.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse
import math

import seqio
import tensorflow as tf

from t5x_lite.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE

SCHEME_ORDER = ('sentence_permutation', 'token_masking', 'token_deletion',
                'text_infilling', 'document_rotation')
SENTENCE_END_MARKS = ('.', '!', '?')


def _to_int(x):
  return tf.cast(x, tf.int32)


def _to_float(x):
  return tf.cast(x, tf.float32)


# ----------------------------------------------------------------------------
# Ids from the vocabulary.


def _vocabulary(output_features):
  if not output_features or 'targets' not in output_features:
    raise UserError(
        "BART noise needs output_features['targets'] (for its vocabulary) or "
        'explicit ids.')
  return output_features['targets'].vocabulary


def resolve_mask_id(output_features=None, mask_id=None):
  """The [MASK] id: `mask_id`, else the vocabulary's (see module docstring)."""
  if mask_id is not None:
    return int(mask_id)
  vocabulary = _vocabulary(output_features)
  if getattr(vocabulary, 'mask_id', None) is not None:
    return int(vocabulary.mask_id)
  if getattr(vocabulary, 'extra_ids', 0):
    return vocabulary.vocab_size - 1
  raise UserError(
      'The targets vocabulary has no mask_id and no sentinels (extra_ids); '
      'pass mask_id explicitly to the BART noise preprocessors.')


def default_sentence_end_ids(vocabulary):
  """Ids that decode to '.', '!' or '?' in the encodings of those marks."""
  ids = []
  for mark in SENTENCE_END_MARKS:
    for i in vocabulary.encode(mark):
      if vocabulary.decode([i]).strip() == mark and i not in ids:
        ids.append(int(i))
  if not ids:
    raise UserError('No sentence-end ids found in the vocabulary; pass '
                    'sentence_end_ids explicitly.')
  return tuple(ids)


def _check_rate(name, rate, high=1.0):
  if not 0.0 <= rate <= high:
    raise UserError(f'{name} must be in [0, {high}], got {rate}.')


# ----------------------------------------------------------------------------
# Per-example functions on a 1-D int32 token tensor.


def _count(n, rate):
  """round(n * rate) as Python computes it (float64, half to even)."""
  return _to_int(tf.round(tf.cast(n, tf.float64) * rate))


def _source_key(x):
  return 'inputs' if 'inputs' in x else 'targets'


def _random_positions_mask(n, count, seed):
  """Bool [n] with exactly `count` True at uniformly random positions."""
  rank = tf.argsort(tf.argsort(tf.random.stateless_uniform([n], seed)))
  return rank < count


def mask_tokens(tokens, seed, mask_rate, mask_id):
  n = tf.size(tokens)
  count = _count(n, mask_rate)
  chosen = _random_positions_mask(n, count, seed)
  return tf.where(chosen, tf.cast(mask_id, tokens.dtype), tokens)


def delete_tokens(tokens, seed, delete_rate):
  n = tf.size(tokens)
  count = _count(n, delete_rate)
  return tf.boolean_mask(tokens, tf.logical_not(
      _random_positions_mask(n, count, seed)))


def _draw_poisson_lengths(num_mask, seed, poisson_lambda):
  """Poisson draws until their sum reaches num_mask (none if num_mask == 0)."""
  chunk = tf.maximum(
      _to_int(tf.math.ceil(_to_float(num_mask) / poisson_lambda)) + 4, 8)

  def cond(drawn, i):
    del i
    return tf.reduce_sum(drawn) < num_mask

  def body(drawn, i):
    more = tf.random.stateless_poisson(
        [chunk], tf.random.experimental.stateless_fold_in(seed, i),
        poisson_lambda, dtype=tf.int32)
    return tf.concat([drawn, more], 0), i + 1

  drawn, _ = tf.while_loop(
      cond, body, [tf.zeros([0], tf.int32), tf.constant(0)],
      shape_invariants=[tf.TensorShape([None]), tf.TensorShape([])])
  # Keep draws up to the first one where the running sum reaches num_mask.
  cum = tf.cumsum(drawn)
  num_spans = tf.where(
      num_mask > 0,
      _to_int(tf.reduce_sum(_to_int(cum < num_mask))) + 1, 0)
  return drawn[:num_spans]


def infilling_spans(n, seeds, mask_rate=0.3, poisson_lambda=3.0):
  """Spans of text infilling for a document of n tokens.

  Args:
    n: int32 scalar, number of tokens.
    seeds: three stateless seeds (int32 pairs).
    mask_rate: fraction of tokens to mask.
    poisson_lambda: mean span length.

  Returns:
    (starts, lengths, drawn): int32 vectors; span j covers
    tokens[starts[j]:starts[j] + lengths[j]] and spans are in increasing
    order; `drawn` are all Poisson draws in draw order, the last untruncated.
  """
  num_mask = _count(n, mask_rate)
  drawn = _draw_poisson_lengths(num_mask, seeds[0], poisson_lambda)
  k_drawn = tf.size(drawn)
  before_last = tf.reduce_sum(drawn[:-1])
  lengths = tf.concat(
      [drawn[:-1], tf.reshape(num_mask - before_last, [-1])[:k_drawn]], 0)
  lengths = lengths[:k_drawn]

  # At most n - num_mask + 1 spans fit with a token between neighbours; drop
  # zero-length spans, the last drawn first, until they fit.
  capacity = n - num_mask + 1
  is_zero = tf.equal(lengths, 0)
  num_nonzero = tf.reduce_sum(_to_int(tf.logical_not(is_zero)))
  zero_rank = tf.cumsum(_to_int(is_zero))
  keep = tf.logical_or(tf.logical_not(is_zero),
                       zero_rank <= capacity - num_nonzero)
  lengths = tf.boolean_mask(lengths, keep)
  k = tf.size(lengths)

  lengths = seqio.utils.stateless_shuffle(lengths, seeds[1])
  # Uniform weak composition of `free` into k + 1 gaps: k bars among
  # free + k slots.
  free = tf.maximum(n - num_mask - tf.maximum(k - 1, 0), 0)
  slots = tf.concat([tf.ones([k], tf.int32), tf.zeros([free], tf.int32)], 0)
  slots = seqio.utils.stateless_shuffle(slots, seeds[2])
  bars = _to_int(tf.reshape(tf.where(tf.equal(slots, 1)), [-1]))
  # Gap before bar j = zeros between bar j-1 and bar j.
  gaps = bars - tf.concat([[-1], bars], 0)[:k] - 1
  gaps += _to_int(tf.range(k) > 0)  # one token between neighbouring spans
  starts = tf.cumsum(gaps + lengths) - lengths
  return starts, lengths, drawn


def infill_tokens(tokens, starts, lengths, mask_id):
  """Replaces each span (start, length) by one mask token."""
  n = tf.size(tokens)
  positions = tf.range(n)
  covered = tf.math.unsorted_segment_sum(
      tf.ones_like(lengths), starts, n + 1)
  ends = tf.math.unsorted_segment_sum(
      tf.ones_like(lengths), starts + lengths, n + 1)
  in_span = tf.cumsum(covered - ends)[:n] > 0
  keep = tf.logical_not(in_span)
  # Sort keys: token at position p -> 2p + 1, mask of a span at s -> 2s.
  keys = tf.concat([tf.boolean_mask(2 * positions + 1, keep), 2 * starts], 0)
  values = tf.concat(
      [tf.boolean_mask(tokens, keep),
       tf.fill([tf.size(starts)], tf.cast(mask_id, tokens.dtype))], 0)
  return tf.gather(values, tf.argsort(keys))


def permute_sentences(tokens, seed, sentence_end_ids):
  n = tf.size(tokens)
  ends = tf.constant(list(sentence_end_ids), tokens.dtype)
  is_end = _to_int(tf.reduce_any(
      tf.equal(tokens[:, None], ends[None, :]), axis=1))
  sentence = tf.cumsum(is_end) - is_end
  num_sentences = tf.where(n > 0, tf.reduce_max(
      tf.concat([sentence, [0]], 0)) + 1, 0)
  order = seqio.utils.stateless_shuffle(tf.range(num_sentences), seed)
  rank = tf.math.invert_permutation(order)
  return tf.gather(
      tokens, tf.argsort(tf.gather(rank, sentence), stable=True))


def rotate_tokens(tokens, seed):
  n = tf.size(tokens)
  start = tf.random.stateless_uniform(
      [], seed, maxval=tf.maximum(n, 1), dtype=tf.int32)
  return tf.concat([tokens[start:], tokens[:start]], 0)


# ----------------------------------------------------------------------------
# Preprocessors.


def token_masking(dataset, sequence_length=None, output_features=None,
                  mask_rate=0.15, mask_id=None):
  """Replaces round(n * mask_rate) random tokens by the mask id."""
  del sequence_length
  _check_rate('mask_rate', mask_rate)
  mask_id = resolve_mask_id(output_features, mask_id)

  @seqio.map_over_dataset(num_seeds=1)
  def fn(x, seed):
    x = dict(x)
    x['inputs'] = mask_tokens(x[_source_key(x)], seed, mask_rate, mask_id)
    return x

  return fn(dataset)


def token_deletion(dataset, sequence_length=None, output_features=None,
                   delete_rate=0.15):
  """Removes round(n * delete_rate) random tokens."""
  del sequence_length, output_features
  _check_rate('delete_rate', delete_rate)

  @seqio.map_over_dataset(num_seeds=1)
  def fn(x, seed):
    x = dict(x)
    x['inputs'] = delete_tokens(x[_source_key(x)], seed, delete_rate)
    return x

  return fn(dataset)


def text_infilling(dataset, sequence_length=None, output_features=None,
                   mask_rate=0.3, poisson_lambda=3.0, mask_id=None,
                   record_spans=False):
  """Replaces Poisson-length spans (zero-length included) by one mask each.

  See the module docstring for the exact procedure. `record_spans` adds the
  'infilling_span_starts', 'infilling_span_lengths' and
  'infilling_drawn_lengths' features.
  """
  del sequence_length
  _check_rate('mask_rate', mask_rate, high=0.5)
  if not poisson_lambda > 0:
    raise UserError(f'poisson_lambda must be > 0, got {poisson_lambda}.')
  mask_id = resolve_mask_id(output_features, mask_id)

  @seqio.map_over_dataset(num_seeds=3)
  def fn(x, seeds):
    x = dict(x)
    tokens = x[_source_key(x)]
    starts, lengths, drawn = infilling_spans(
        tf.size(tokens), seeds, mask_rate, poisson_lambda)
    x['inputs'] = infill_tokens(tokens, starts, lengths, mask_id)
    if record_spans:
      x['infilling_span_starts'] = starts
      x['infilling_span_lengths'] = lengths
      x['infilling_drawn_lengths'] = drawn
    return x

  return fn(dataset)


def sentence_permutation(dataset, sequence_length=None, output_features=None,
                         sentence_end_ids=None):
  """Shuffles the sentences (each ends with a `sentence_end_ids` token)."""
  del sequence_length
  if sentence_end_ids is None:
    sentence_end_ids = default_sentence_end_ids(_vocabulary(output_features))
  sentence_end_ids = tuple(int(i) for i in sentence_end_ids)
  if not sentence_end_ids:
    raise UserError('sentence_end_ids must not be empty.')

  @seqio.map_over_dataset(num_seeds=1)
  def fn(x, seed):
    x = dict(x)
    x['inputs'] = permute_sentences(x[_source_key(x)], seed, sentence_end_ids)
    return x

  return fn(dataset)


def document_rotation(dataset, sequence_length=None, output_features=None):
  """Rotates the document to start at a uniformly random token."""
  del sequence_length, output_features

  @seqio.map_over_dataset(num_seeds=1)
  def fn(x, seed):
    x = dict(x)
    x['inputs'] = rotate_tokens(x[_source_key(x)], seed)
    return x

  return fn(dataset)


def bart_denoise(dataset, sequence_length=None, output_features=None,
                 schemes=('sentence_permutation', 'text_infilling'),
                 mask_id=None, sentence_end_ids=None, mask_rate=0.15,
                 delete_rate=0.15, infilling_mask_rate=0.3,
                 poisson_lambda=3.0):
  """Applies the listed BART schemes in the fixed order `SCHEME_ORDER`.

  The order is that of fairseq's DenoisingDataset: sentence permutation,
  token masking, token deletion, text infilling, document rotation; the
  order of `schemes` itself does not matter. The default is the paper's best
  combination, text infilling + sentence permutation.

  Args:
    dataset: tf.data.Dataset with a tokenized 'targets' feature (no EOS).
    sequence_length: unused (seqio preprocessor signature).
    output_features: dict of seqio.Feature; the 'targets' vocabulary gives
      the default mask and sentence-end ids.
    schemes: names from SCHEME_ORDER.
    mask_id: [MASK] id (default: from the vocabulary).
    sentence_end_ids: sentence-end ids (default: from the vocabulary).
    mask_rate: token masking rate.
    delete_rate: token deletion rate.
    infilling_mask_rate: text infilling masked fraction.
    poisson_lambda: text infilling mean span length.

  Returns:
    The dataset with 'inputs' = noised tokens and 'targets' unchanged.
  """
  schemes = tuple(schemes)
  unknown = [s for s in schemes if s not in SCHEME_ORDER]
  if unknown:
    raise UserError(f'Unknown BART noise schemes {unknown}; choose from '
                    f'{list(SCHEME_ORDER)}.')
  needs_mask = {'token_masking', 'text_infilling'} & set(schemes)
  if needs_mask:
    mask_id = resolve_mask_id(output_features, mask_id)
  for scheme in SCHEME_ORDER:
    if scheme not in schemes:
      continue
    if scheme == 'sentence_permutation':
      dataset = sentence_permutation(dataset, sequence_length, output_features,
                                     sentence_end_ids=sentence_end_ids)
    elif scheme == 'token_masking':
      dataset = token_masking(dataset, sequence_length, output_features,
                              mask_rate=mask_rate, mask_id=mask_id)
    elif scheme == 'token_deletion':
      dataset = token_deletion(dataset, sequence_length, output_features,
                               delete_rate=delete_rate)
    elif scheme == 'text_infilling':
      dataset = text_infilling(dataset, sequence_length, output_features,
                               mask_rate=infilling_mask_rate,
                               poisson_lambda=poisson_lambda, mask_id=mask_id)
    else:
      dataset = document_rotation(dataset, sequence_length, output_features)
  return dataset


# ----------------------------------------------------------------------------
# Statistics over the embedded corpus.


def infilling_stats(token_lists, seed=0, mask_rate=0.3, poisson_lambda=3.0,
                    mask_id=0):
  """Pooled text-infilling statistics over documents (lists of ids)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_generator(
      lambda: ({'targets': np.asarray(t, np.int32)} for t in token_lists),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  with seqio.utils.map_seed_manager(seed):
    ds = text_infilling(ds, mask_rate=mask_rate, poisson_lambda=poisson_lambda,
                        mask_id=mask_id, record_spans=True)
  tokens = masked = spans = nonzero_spans = nonzero_len = 0
  drawn_sum = drawn_count = 0
  for ex in ds.as_numpy_iterator():
    lengths = ex['infilling_span_lengths']
    tokens += len(ex['targets'])
    masked += int(lengths.sum())
    spans += len(lengths)
    nonzero_spans += int((lengths > 0).sum())
    nonzero_len += int(lengths[lengths > 0].sum())
    drawn_sum += int(ex['infilling_drawn_lengths'].sum())
    drawn_count += len(ex['infilling_drawn_lengths'])
  return {
      'documents': len(token_lists),
      'tokens': tokens,
      'masked_fraction': masked / max(tokens, 1),
      'mean_span_length': masked / max(spans, 1),
      'mean_nonzero_span_length': nonzero_len / max(nonzero_spans, 1),
      'zero_length_span_fraction': 1 - nonzero_spans / max(spans, 1),
      'mean_drawn_length': drawn_sum / max(drawn_count, 1),
      'expected_nonzero_poisson_mean':
          poisson_lambda / (1 - math.exp(-poisson_lambda)),
  }


def _corpus_token_lists(num_docs):
  from t5x_lite.data import corpus  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  docs = corpus.split_documents('train')
  vocabulary = vocab_lib.embedded_vocabulary()
  encoded = [vocabulary.encode(d) for d in docs[:num_docs]]
  return [encoded[i % len(encoded)] for i in range(num_docs)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--stats', action='store_true',
                      help='print text-infilling statistics on the corpus')
  parser.add_argument('--num_docs', type=int, default=10000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if not args.stats:
    parser.print_help()
    return
  stats = infilling_stats(_corpus_token_lists(args.num_docs), seed=args.seed)
  print(f"documents: {stats['documents']}  tokens: {stats['tokens']}")
  print(f"masked fraction: {stats['masked_fraction']:.4f}")
  print('mean span length (zero-length spans included): '
        f"{stats['mean_span_length']:.4f}")
  print('mean span length (zero-length spans excluded): '
        f"{stats['mean_nonzero_span_length']:.4f} "
        f"(E[Poisson | > 0] = {stats['expected_nonzero_poisson_mean']:.4f})")
  print(f"zero-length span fraction: {stats['zero_length_span_fraction']:.4f}")
  print('mean drawn length (zeros included, before truncation): '
        f"{stats['mean_drawn_length']:.4f}")


if __name__ == '__main__':
  main()
