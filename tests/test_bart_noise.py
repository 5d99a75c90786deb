"""BART noise: rates, span statistics, reconstruction, seeds, composition."""

import collections
import math
import types

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import bart_noise as bn
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError

VOCAB = vocab_lib.embedded_vocabulary()
FEATURES = {k: seqio.Feature(VOCAB, add_eos=True) for k in ('inputs', 'targets')}
MASK = VOCAB.vocab_size - 1  # <extra_id_0>
ENDS = (7, 8)


def run(preprocessor, docs, seed=0, **kwargs):
  ds = tf.data.Dataset.from_generator(
      lambda: ({'targets': np.asarray(t, np.int32)} for t in docs),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  with seqio.utils.map_seed_manager(seed):
    ds = preprocessor(ds, sequence_length=None, output_features=FEATURES,
                      **kwargs)
  return [{k: v.tolist() for k, v in ex.items()}
          for ex in ds.as_numpy_iterator()]


def distinct_docs(num, low, high, seed=0):
  """Documents of distinct increasing ids (10, 11, ...) of random lengths."""
  rng = np.random.default_rng(seed)
  return [list(range(10, 10 + int(n))) for n in rng.integers(low, high, num)]


def sentence_docs(num, seed=0):
  """Random ids in [10, 60) with sentence ends from ENDS."""
  rng = np.random.default_rng(seed)
  docs = []
  for n in rng.integers(5, 60, num):
    doc = rng.integers(10, 60, n)
    doc[rng.random(n) < 0.15] = rng.choice(ENDS)
    docs.append(doc.tolist())
  return docs


def sentences(tokens):
  out, current = [], []
  for t in tokens:
    current.append(t)
    if t in ENDS:
      out.append(tuple(current))
      current = []
  if current:
    out.append(tuple(current))
  return out


def is_subsequence(sub, seq):
  it = iter(seq)
  return all(t in it for t in sub)


# ----------------------------------------------------------------------------
# Mask id and sentence ends.


def test_mask_id_resolution():
  assert bn.resolve_mask_id(FEATURES) == VOCAB.vocab_size - 1 == 8099
  assert bn.resolve_mask_id(FEATURES, mask_id=5) == 5
  with_mask = {'targets': types.SimpleNamespace(vocabulary=types.SimpleNamespace(
      mask_id=42, extra_ids=100, vocab_size=8100))}
  assert bn.resolve_mask_id(with_mask) == 42
  plain = {'targets': types.SimpleNamespace(vocabulary=types.SimpleNamespace(
      extra_ids=0, vocab_size=100))}
  with pytest.raises(UserError):
    bn.resolve_mask_id(plain)


def test_default_sentence_end_ids_decode_to_marks():
  ids = bn.default_sentence_end_ids(VOCAB)
  assert sorted(VOCAB.decode([i]).strip() for i in ids) == ['!', '.', '?']
  tokens = VOCAB.encode('One. Two! Three? Four')
  out = run(bn.sentence_permutation, [tokens] * 40)
  texts = {VOCAB.decode(ex['inputs']) for ex in out}
  assert len(texts) > 1
  for ex in out:
    assert sorted(ex['inputs']) == sorted(tokens)


# ----------------------------------------------------------------------------
# Token masking and deletion.


def test_token_masking_rate():
  docs = distinct_docs(3000, 1, 200)
  out = run(bn.token_masking, docs)
  masked = total = 0
  for ex in out:
    inputs, targets = np.array(ex['inputs']), np.array(ex['targets'])
    assert len(inputs) == len(targets)
    changed = inputs != targets
    assert np.all(inputs[changed] == MASK)
    assert changed.sum() == round(len(targets) * 0.15)
    masked += changed.sum()
    total += len(targets)
  assert abs(masked / total - 0.15) < 0.005


def test_token_masking_positions_uniform():
  out = run(bn.token_masking, [list(range(10, 30))] * 2000)
  counts = np.sum([np.array(ex['inputs']) == MASK for ex in out], axis=0)
  assert np.all(np.abs(counts / 2000 - 0.15) < 0.04)


def test_token_deletion_rate_and_subsequence():
  docs = distinct_docs(3000, 1, 200)
  out = run(bn.token_deletion, docs)
  deleted = total = 0
  for ex in out:
    inputs, targets = ex['inputs'], ex['targets']
    assert is_subsequence(inputs, targets)
    assert len(targets) - len(inputs) == round(len(targets) * 0.15)
    deleted += len(targets) - len(inputs)
    total += len(targets)
  assert abs(deleted / total - 0.15) < 0.005


# ----------------------------------------------------------------------------
# Text infilling.


@pytest.fixture(scope='module')
def infilled():
  docs = distinct_docs(3000, 20, 300)
  return run(bn.text_infilling, docs, record_spans=True)


def expand(inputs, starts, lengths, original):
  """Inputs with each mask replaced by its span of `original`."""
  out, j = [], 0
  for t in inputs:
    if t == MASK:
      out.extend(original[starts[j]:starts[j] + lengths[j]])
      j += 1
    else:
      out.append(t)
  assert j == len(starts)
  return out


def test_infilling_reconstructs(infilled):
  for ex in infilled:
    starts, lengths = ex['infilling_span_starts'], ex['infilling_span_lengths']
    assert ex['inputs'].count(MASK) == len(starts)
    ends = [s + n for s, n in zip(starts, lengths)]
    assert all(e < s for e, s in zip(ends[:-1], starts[1:]))  # never touch
    assert all(0 <= s and e <= len(ex['targets'])
               for s, e in zip(starts, ends))
    assert expand(ex['inputs'], starts, lengths, ex['targets']) == ex['targets']


def test_infilling_without_record_on_distinct_tokens(infilled):
  # Non-mask tokens are an increasing subsequence; the masked count is what
  # the gaps around the masks say.
  for ex in infilled[:500]:
    inputs, targets = ex['inputs'], ex['targets']
    kept = [t for t in inputs if t != MASK]
    assert kept == sorted(kept) and is_subsequence(kept, targets)
    assert len(targets) - len(kept) == round(len(targets) * 0.3)


def test_infilling_statistics(infilled):
  tokens = sum(len(ex['targets']) for ex in infilled)
  used = np.concatenate([ex['infilling_span_lengths'] for ex in infilled])
  drawn = np.concatenate([ex['infilling_drawn_lengths'] for ex in infilled])
  # Exactly round(0.3 n) tokens per document.
  for ex in infilled:
    assert sum(ex['infilling_span_lengths']) == round(len(ex['targets']) * 0.3)
  assert abs(used.sum() / tokens - 0.3) < 0.005
  # Drawn lengths are Poisson(3) draws (Wald's identity): mean 3.0 zeros
  # included; P(0) = e^-3.
  assert abs(drawn.mean() - 3.0) < 0.05
  assert abs(np.mean(drawn == 0) - math.exp(-3)) < 0.01
  # Used lengths: the last of each document is truncated, so slightly less.
  assert 2.7 < used.mean() < 3.0
  nonzero_mean = used[used > 0].mean()
  assert 2.9 < nonzero_mean < 3 / (1 - math.exp(-3)) + 0.02


def test_infilling_zero_length_spans_insert_a_mask(infilled):
  inserts = 0
  for ex in infilled:
    for s, n in zip(ex['infilling_span_starts'], ex['infilling_span_lengths']):
      if n:
        continue
      inserts += 1
      inputs, targets = ex['inputs'], ex['targets']
      # A mask right before the original token at s (or at the end).
      nxt = targets[s] if s < len(targets) else None
      prev = targets[s - 1] if s > 0 else None
      i = inputs.index(nxt) if nxt is not None else len(inputs)
      assert inputs[i - 1] == MASK
      if prev is not None:
        assert inputs[i - 2] == prev
  assert inserts > 100


def test_infilling_short_docs_and_capacity():
  out = run(bn.text_infilling, [[], [5], [5, 6], [5, 6, 7]] * 50,
            record_spans=True, mask_rate=0.5)
  for ex in out:
    starts, lengths = ex['infilling_span_starts'], ex['infilling_span_lengths']
    assert sum(lengths) == round(len(ex['targets']) * 0.5)
    assert expand(ex['inputs'], starts, lengths, ex['targets']) == ex['targets']


def test_infilling_rejects_bad_arguments():
  with pytest.raises(UserError):
    run(bn.text_infilling, [[1]], mask_rate=0.7)
  with pytest.raises(UserError):
    run(bn.text_infilling, [[1]], poisson_lambda=0.0)


# ----------------------------------------------------------------------------
# Sentence permutation and rotation.


def test_sentence_permutation_preserves_sentences():
  # Documents end with a sentence end, so the sentences of the output are
  # exactly the shuffled sentences of the input.
  docs = [d + [ENDS[0]] for d in sentence_docs(2000)]
  out = run(bn.sentence_permutation, docs, sentence_end_ids=ENDS)
  moved = 0
  for ex in out:
    assert (collections.Counter(sentences(ex['inputs'])) ==
            collections.Counter(sentences(ex['targets'])))
    moved += ex['inputs'] != ex['targets']
  assert moved > 1000


def test_document_rotation_is_a_rotation():
  out = run(bn.document_rotation, [list(range(10, 20))] * 2000)
  starts = collections.Counter()
  for ex in out:
    start = ex['inputs'][0] - 10
    assert ex['inputs'] == ex['targets'][start:] + ex['targets'][:start]
    starts[start] += 1
  assert sorted(starts) == list(range(10))
  assert min(starts.values()) > 130


# ----------------------------------------------------------------------------
# Seeds, composition, degenerate documents.


@pytest.mark.parametrize('scheme', bn.SCHEME_ORDER)
def test_deterministic_by_seed(scheme):
  docs = sentence_docs(30, seed=1)
  kwargs = {'schemes': (scheme,), 'sentence_end_ids': ENDS}
  a = run(bn.bart_denoise, docs, seed=3, **kwargs)
  b = run(bn.bart_denoise, docs, seed=3, **kwargs)
  c = run(bn.bart_denoise, docs, seed=4, **kwargs)
  assert a == b
  assert [x['inputs'] for x in a] != [x['inputs'] for x in c]


def test_composition_default():
  docs = [[t + 100 for t in d] for d in sentence_docs(300, seed=2)]
  ends = tuple(e + 100 for e in ENDS)
  out = run(bn.bart_denoise, docs, sentence_end_ids=ends)
  assert [ex['targets'] for ex in out] == docs
  for ex in out:
    kept = [t for t in ex['inputs'] if t != MASK]
    assert len(ex['targets']) - len(kept) == round(len(ex['targets']) * 0.3)
    assert collections.Counter(kept) <= collections.Counter(ex['targets'])
  assert sum(ex['inputs'].count(MASK) for ex in out) > 300


def test_schemes_chain_through_inputs():
  docs = distinct_docs(200, 20, 60)

  def chained(ds, sequence_length, output_features):
    ds = bn.token_masking(ds, sequence_length, output_features)
    return bn.token_deletion(ds, sequence_length, output_features)

  for ex in run(chained, docs):
    n = len(ex['targets'])
    assert len(ex['inputs']) == n - round(n * 0.15)
    assert ex['targets'] == list(range(10, 10 + n))


def test_unknown_scheme():
  with pytest.raises(UserError):
    run(bn.bart_denoise, [[1]], schemes=('sentence_shuffle',))


def test_empty_and_single_token_docs():
  out = run(bn.bart_denoise, [[], [5], [], [7]] * 5, schemes=bn.SCHEME_ORDER,
            sentence_end_ids=ENDS, mask_rate=0.5, delete_rate=0.5,
            infilling_mask_rate=0.5)
  assert len(out) == 20
  for ex in out:
    assert len(ex['inputs']) <= max(len(ex['targets']), 1)


def test_sentence_permutation_trailing_fragment_is_a_sentence():
  doc = [10, 11, 7, 12, 8, 13, 14]
  units = [(10, 11, 7), (12, 8), (13, 14)]
  seen = set()
  for ex in run(bn.sentence_permutation, [doc] * 200, sentence_end_ids=ENDS):
    order = []
    rest = ex['inputs']
    while rest:
      unit = next(u for u in units if tuple(rest[:len(u)]) == u)
      order.append(unit)
      rest = rest[len(unit):]
    assert sorted(order) == sorted(units)
    seen.add(tuple(order))
  assert len(seen) == 6
