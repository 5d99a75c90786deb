"""T5 span corruption: lengths, mask statistics, sentinels, reconstruction."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import corpus
from t5x_lite.data import preprocessors as pp
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError

LENGTHS = {'inputs': 512, 'targets': 114}
VOCAB = vocab_lib.embedded_vocabulary()
TOP = VOCAB.vocab_size - 1  # <extra_id_0>
FIRST_SENTINEL = VOCAB.vocab_size - vocab_lib.EXTRA_IDS
FEATURES = {k: seqio.Feature(VOCAB, add_eos=True) for k in ('inputs', 'targets')}


def corrupt(token_lists, seed, lengths=None, **kwargs):
  lengths = lengths or LENGTHS
  ds = tf.data.Dataset.from_generator(
      lambda: ({'targets': np.asarray(t, np.int32)} for t in token_lists),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  with seqio.utils.map_seed_manager(seed):
    ds = pp.span_corruption(ds, lengths, FEATURES, **kwargs)
    ds = seqio.preprocessors.append_eos_after_trim(
        ds, sequence_length=lengths, output_features=FEATURES)
  return [{k: v.tolist() for k, v in ex.items()}
          for ex in ds.as_numpy_iterator()]


def reconstruct(inputs, targets):
  """Original tokens from (inputs, targets) without EOS."""
  assert inputs[-1] == 1 and targets[-1] == 1
  inputs, targets = inputs[:-1], targets[:-1]
  spans, current = {}, None
  for t in targets:
    if t >= FIRST_SENTINEL:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out.extend(spans[t] if t >= FIRST_SENTINEL else [t])
  return out


def sentinels(tokens):
  return [t for t in tokens if t >= FIRST_SENTINEL]


@pytest.fixture(scope='module')
def docs_tokens():
  docs = corpus.split_documents('train')
  rng = np.random.default_rng(0)
  picked = [docs[i] for i in rng.choice(len(docs), 400, replace=False)]
  return [VOCAB.encode(d) for d in picked]


@pytest.fixture(scope='module')
def examples(docs_tokens):
  return corrupt(docs_tokens, seed=3)


def test_random_spans_helper():
  assert pp.random_spans_helper(512, 0.15, 3.0, 1, 1) == (568, 114)
  assert pp.random_spans_helper(128, 0.15, 3.0, 1, 1) == (141, 29)


def _expected_counts(length, density=0.15, mean=3.0):
  # The mask computes in float32 (like T5), with round-half-to-even.
  length = max(length, 2)
  noise = int(np.round(np.float32(length) * np.float32(density)))
  noise = min(max(noise, 1), length - 1)
  spans = max(int(np.round(np.float32(noise) / np.float32(mean))), 1)
  return noise, spans


def test_noise_mask_counts_and_shape():
  rng = np.random.default_rng(0)
  for length in list(range(1, 60)) + list(rng.integers(60, 2000, 60)):
    length = int(length)
    seeds = rng.integers(0, 2**31, (2, 2)).tolist()
    mask = pp.random_spans_noise_mask(length, 0.15, seeds).numpy()
    assert mask.shape == (length,)
    if length < 2:
      continue
    noise, spans = _expected_counts(length)
    assert mask.sum() == noise, length
    assert not mask[0], 'masks start with non-noise'
    starts = np.sum(mask[1:] & ~mask[:-1])
    assert starts == spans, length


def test_noise_mask_is_random_and_seeded():
  a = pp.random_spans_noise_mask(568, 0.15, [(1, 2), (3, 4)]).numpy()
  b = pp.random_spans_noise_mask(568, 0.15, [(1, 2), (3, 4)]).numpy()
  c = pp.random_spans_noise_mask(568, 0.15, [(5, 6), (7, 8)]).numpy()
  assert (a == b).all() and (a != c).any()


def test_sentinel_replacement_golden():
  tokens = tf.constant([10, 11, 12, 13, 14, 15, 16])
  mask = tf.constant([False, True, True, False, False, True, False])
  assert pp.noise_span_to_unique_sentinel(tokens, mask, VOCAB).numpy(
  ).tolist() == [10, TOP, 13, 14, TOP - 1, 16]
  assert pp.nonnoise_span_to_unique_sentinel(tokens, mask, VOCAB).numpy(
  ).tolist() == [TOP, 11, 12, TOP - 1, 15, TOP - 2]


def test_full_length_examples(docs_tokens, examples):
  full = [e for e in examples if len(e['inputs']) == 512]
  # Only the tail of each batch of 128 concatenated documents may be short.
  assert len(examples) - len(full) <= -(-len(docs_tokens) // 128)
  for ex in examples:
    assert len(ex['inputs']) <= 512 and len(ex['targets']) <= 114
    assert ex['inputs'][-1] == 1 and ex['targets'][-1] == 1
  for ex in full:
    assert len(ex['targets']) == 114
    assert len(sentinels(ex['inputs'])) == 28  # round(85 / 3)
    noise = len(ex['targets']) - 28 - 1
    assert noise == 85  # round(568 * 0.15)


def test_noise_fraction_and_sentinel_order(examples):
  fractions = []
  for ex in examples:
    s_in, s_tg = sentinels(ex['inputs']), sentinels(ex['targets'])
    assert s_in == list(range(TOP, TOP - len(s_in), -1))
    assert s_tg == list(range(TOP, TOP - len(s_tg), -1))
    assert len(s_in) == len(s_tg) >= 1
    assert ex['targets'][0] == TOP
    original = reconstruct(ex['inputs'], ex['targets'])
    noise = len(ex['targets']) - 1 - len(s_tg)
    fractions.append(noise / len(original))
  assert abs(np.mean(fractions) - 0.15) < 0.005


def test_reconstructs_the_concatenated_documents(docs_tokens, examples):
  original = [t for doc in docs_tokens for t in doc]
  rebuilt = [t for ex in examples
             for t in reconstruct(ex['inputs'], ex['targets'])]
  assert rebuilt == original
  text = VOCAB.decode(reconstruct(examples[0]['inputs'],
                                  examples[0]['targets']))
  assert VOCAB.decode(original[:len(VOCAB.encode(text))])[:200] == text[:200]


def test_seed_determinism(docs_tokens, examples):
  again = corrupt(docs_tokens, seed=3)
  assert again == examples
  other = corrupt(docs_tokens, seed=4)
  assert other != examples
  assert ([reconstruct(e['inputs'], e['targets']) for e in other] ==
          [reconstruct(e['inputs'], e['targets']) for e in examples])


def test_without_merging(docs_tokens):
  out = corrupt(docs_tokens[:50], seed=0,
                merge_examples_to_reduce_padding=False)
  rebuilt = [reconstruct(e['inputs'], e['targets']) for e in out]
  expected = [d[i:i + 568] for d in docs_tokens[:50] if d
              for i in range(0, len(d), 568)]
  assert rebuilt == expected


def test_golden_short_inputs():
  # 10 tokens: round(1.5) = 2 noise tokens in one span, which ends the doc.
  assert corrupt([list(range(10, 20))], seed=0) == [{
      'inputs': [10, 11, 12, 13, 14, 15, 16, 17, TOP, 1],
      'targets': [TOP, 18, 19, 1]}]
  # 40 tokens: 6 noise tokens in 2 spans; the split depends on the seed.
  assert corrupt([list(range(10, 50))], seed=0) == [{
      'inputs': list(range(10, 35)) + [TOP] + list(range(39, 48)) +
                [TOP - 1, 1],
      'targets': [TOP, 35, 36, 37, 38, TOP - 1, 48, 49, 1]}]
  assert corrupt([list(range(10, 50))], seed=1) == [{
      'inputs': list(range(10, 31)) + [TOP] + list(range(35, 48)) +
                [TOP - 1, 1],
      'targets': [TOP, 31, 32, 33, 34, TOP - 1, 48, 49, 1]}]
  # A single token still works (degenerate mask of length 2, cut to 1).
  (one,) = corrupt([[42]], seed=0)
  assert reconstruct(one['inputs'], one['targets']) == [42]
  # Empty documents are dropped.
  assert corrupt([[]], seed=0) == []


def test_targets_length_too_short_is_a_user_error():
  with pytest.raises(UserError, match='targets'):
    corrupt([[5, 6, 7]], seed=0, lengths={'inputs': 512, 'targets': 100})


def test_reserved_for_packing():
  (ex,) = corrupt([list(range(10, 1000))[:200]], seed=0,
                  lengths={'inputs': 64, 'targets': 14},
                  reserved_for_packing=4)[:1]
  assert len(ex['inputs']) == 60
