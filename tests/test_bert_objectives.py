"""WordPiece vocabulary, BERT's MLM and NSP preprocessors."""

import math
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import bert_objectives as bo
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError


@pytest.fixture(scope='module')
def vocab():
  return wordpiece.embedded_wordpiece_vocabulary()


@pytest.fixture(scope='module')
def features(vocab):
  return {k: seqio.Feature(vocabulary=vocab, add_eos=False)
          for k in ('inputs', 'targets')}


# ----------------------------------------------------------------------------
# WordPiece vocabulary.


def test_embedded_special_ids(vocab):
  assert (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id,
          vocab.mask_id) == (0, 1, 2, 3, 4)
  assert vocab.eos_id is None
  assert 5000 < vocab.vocab_size <= 8000
  assert os.path.getsize(wordpiece.EMBEDDED_WORDPIECE_PATH) < 200_000


def test_round_trip_lower_case(vocab):
  text = 'return a new list containing all items from the iterable'
  ids = vocab.encode(text)
  assert vocab.unk_id not in ids
  assert vocab.decode(ids) == text
  assert vocab.decode(vocab.encode(text.upper())) == text
  # Unknown words are split into pieces and joined back.
  assert vocab.decode(vocab.encode('unsubclassable')) == 'unsubclassable'


def test_tf_encode_decode(vocab):
  texts = ['the default value', 'open a file']
  ragged = vocab.encode_tf(tf.constant(texts))
  assert ragged.shape[0] == 2
  assert vocab.encode_tf(tf.constant(texts[0])).numpy().tolist() == (
      vocab.encode(texts[0]))
  padded = ragged.to_tensor(default_value=vocab.pad_id)
  assert [t.decode() for t in vocab.decode_tf(padded).numpy()] == texts


def _write_bert_layout_vocab(path):
  tokens = ['[PAD]'] + [f'[unused{i}]' for i in range(99)]
  tokens += ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
  tokens += ['the', 'cat', 'sat', 'on', 'mat', 'play', '##ing', '##s', '.']
  path.write_text('\n'.join(tokens) + '\n')
  return tokens


def test_user_vocab_with_bert_layout(tmp_path):
  path = tmp_path / 'vocab.txt'
  tokens = _write_bert_layout_vocab(path)
  v = wordpiece.WordPieceVocabulary(str(path))
  assert (v.pad_id, v.unk_id, v.cls_id, v.sep_id, v.mask_id) == (
      0, 100, 101, 102, 103)
  assert v.vocab_size == len(tokens)
  ids = v.encode('The cat sat on the mat playing. Dog')
  assert ids[-1] == 100  # 'dog' is unknown
  assert v.decode(ids) == 'the cat sat on the mat playing . [UNK]'
  assert 5 not in set(i for i in range(v.vocab_size)
                      if i not in v.special_ids)  # [unused] slots special
  assert v == wordpiece.WordPieceVocabulary(str(path))


def test_missing_vocab_is_user_error(tmp_path):
  missing = tmp_path / 'nope' / 'vocab.txt'
  with pytest.raises(UserError, match=str(missing)):
    wordpiece.WordPieceVocabulary(str(missing))


# ----------------------------------------------------------------------------
# MLM.

NUM_SEQUENCES = 10_000


def _framed_dataset(vocab, n=NUM_SEQUENCES, seed=0):
  """[CLS] a [SEP] b [SEP] of random non-special tokens, lengths 8..40."""
  rng = np.random.default_rng(seed)
  pool = np.array([i for i in range(vocab.vocab_size)
                   if i not in set(vocab.special_ids)])
  seqs, segs = [], []
  for _ in range(n):
    la, lb = rng.integers(3, 20, size=2)
    a, b = rng.choice(pool, la), rng.choice(pool, lb)
    seqs.append(np.concatenate([[vocab.cls_id], a, [vocab.sep_id], b,
                                [vocab.sep_id]]).astype(np.int32))
    segs.append(np.array([0] * (la + 2) + [1] * (lb + 1), np.int32))
  return tf.data.Dataset.from_tensor_slices({
      'inputs': tf.ragged.constant(seqs),
      'segment_ids': tf.ragged.constant(segs)}), seqs


def _run_mlm(vocab, features, seed=0, n=NUM_SEQUENCES, **kw):
  ds, originals = _framed_dataset(vocab, n)
  with seqio.utils.map_seed_manager(seed):
    ds = bo.mlm(ds, {'inputs': 64}, features, **kw)
  return list(ds.as_numpy_iterator()), originals


@pytest.fixture(scope='module')
def mlm_examples(vocab, features):
  return _run_mlm(vocab, features)


def test_mlm_statistics(vocab, mlm_examples):
  examples, originals = mlm_examples
  specials = [vocab.cls_id, vocab.sep_id]
  candidates = selected = expected = masked = randomized = kept = 0
  for x, orig in zip(examples, originals):
    np.testing.assert_array_equal(x['targets'], orig)
    chosen = x['loss_weights'] > 0
    assert set(np.unique(x['loss_weights'])) <= {0.0, 1.0}
    is_special = np.isin(orig, specials)
    assert not np.any(chosen & is_special)  # specials never selected
    np.testing.assert_array_equal(x['inputs'][is_special], orig[is_special])
    # Unselected positions are untouched.
    np.testing.assert_array_equal(x['inputs'][~chosen], orig[~chosen])
    n = int((~is_special).sum())
    candidates += n
    expected += max(1, int(np.round(n * 0.15)))
    selected += int(chosen.sum())
    masked += int(np.sum(chosen & (x['inputs'] == vocab.mask_id)))
    same = x['inputs'] == orig
    kept += int(np.sum(chosen & same))
    randomized += int(np.sum(chosen & ~same & (x['inputs'] != vocab.mask_id)))
    assert not np.isin(x['inputs'][chosen & ~same & (
        x['inputs'] != vocab.mask_id)], vocab.special_ids).any()
  assert selected == expected
  assert abs(selected / candidates - 0.15) < 0.01
  for share, p in ((masked, 0.8), (randomized, 0.1), (kept, 0.1)):
    se = math.sqrt(p * (1 - p) / selected)
    assert abs(share / selected - p) < 5 * se, (share / selected, p)


def test_mlm_keeps_segment_ids(mlm_examples):
  examples, originals = mlm_examples
  for x, orig in zip(examples[:100], originals[:100]):
    assert x['segment_ids'].shape == orig.shape
    assert x['loss_weights'].dtype == np.float32


def test_mlm_deterministic_by_seed(vocab, features):
  a, _ = _run_mlm(vocab, features, seed=3, n=200)
  b, _ = _run_mlm(vocab, features, seed=3, n=200)
  c, _ = _run_mlm(vocab, features, seed=4, n=200)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    np.testing.assert_array_equal(x['loss_weights'], y['loss_weights'])
  assert any(not np.array_equal(x['loss_weights'], z['loss_weights'])
             for x, z in zip(a, c))


def test_mlm_max_predictions(vocab, features):
  examples, _ = _run_mlm(vocab, features, n=300, max_predictions=2)
  assert max(int(x['loss_weights'].sum()) for x in examples) == 2


# ----------------------------------------------------------------------------
# NSP.


def _reference_truncate(la, lb, max_num_tokens):
  while la + lb > max_num_tokens:
    if la > lb:
      la -= 1
    else:
      lb -= 1
  return la, lb


def test_truncated_lengths_match_bert_loop():
  las, lbs = np.meshgrid(np.arange(0, 30), np.arange(0, 30))
  las, lbs = las.ravel(), lbs.ravel()
  for m in (1, 5, 13, 40):
    got_a, got_b = bo.truncated_lengths(tf.constant(las), tf.constant(lbs), m)
    want = [_reference_truncate(a, b, m) for a, b in zip(las, lbs)]
    np.testing.assert_array_equal(np.stack([got_a, got_b], 1), want)


def test_truncate_seq_pair_keeps_contiguous_pieces():
  a, b = tf.range(0, 20), tf.range(100, 107)
  fronts = set()
  for s in range(30):
    ta, tb = bo.truncate_seq_pair(a, b, 12, tf.constant([s, 1]))
    ta, tb = ta.numpy(), tb.numpy()
    assert (len(ta), len(tb)) == (6, 6)
    np.testing.assert_array_equal(np.diff(ta), 1)
    np.testing.assert_array_equal(np.diff(tb), 1)
    fronts.add(int(ta[0]))
  assert len(fronts) > 2  # drops from both ends


def _marker_words(vocab, count):
  words = [t for t in vocab.tokens[200:]
           if t.isalpha() and t.isascii() and len(t) > 3]
  return words[:count]


def _marker_docs(vocab, num_docs, lines=4, words_per_line=3):
  """Doc i repeats one marker word, so B's origin can be read off."""
  markers = _marker_words(vocab, 17)
  docs = ['\n'.join(' '.join([markers[i % 17]] * words_per_line)
                    for _ in range(lines)) for i in range(num_docs)]
  return docs, [vocab.encode(m)[0] for m in markers]


def _run_nsp(docs, features, length, seed=0):
  ds = tf.data.Dataset.from_tensor_slices({'text': tf.constant(docs)})
  with seqio.utils.map_seed_manager(seed):
    ds = bo.nsp(ds, {'inputs': length}, features)
  return list(ds.as_numpy_iterator())


def test_nsp_labels_format_and_segments(vocab, features):
  docs, marker_ids = _marker_docs(vocab, 4000)
  examples = _run_nsp(docs, features, length=64)
  assert len(examples) == len(docs)
  labels = np.array([x['next_sentence_label'] for x in examples])
  se = math.sqrt(0.25 / len(labels))
  assert abs(np.mean(labels == bo.IS_NEXT) - 0.5) < 5 * se
  for x in examples:
    ids, seg = x['inputs'], x['segment_ids']
    sep = np.flatnonzero(ids == vocab.sep_id)
    assert ids[0] == vocab.cls_id and len(sep) == 2 and sep[1] == len(ids) - 1
    np.testing.assert_array_equal(seg[:sep[0] + 1], 0)
    np.testing.assert_array_equal(seg[sep[0] + 1:], 1)
    a, b = ids[1:sep[0]], ids[sep[0] + 1:-1]
    assert len(a) >= 1 and len(b) >= 1
    assert len(set(a)) == 1 and len(set(b)) == 1
    same_doc = a[0] == b[0]
    assert same_doc == (x['next_sentence_label'] == bo.IS_NEXT)
    assert a[0] in marker_ids


def test_nsp_truncation_keeps_specials_and_length(vocab, features):
  docs, _ = _marker_docs(vocab, 200, lines=6, words_per_line=10)
  examples = _run_nsp(docs, features, length=16)
  for x in examples:
    ids = x['inputs']
    assert len(ids) == 16 == len(x['segment_ids'])
    assert ids[0] == vocab.cls_id and ids[-1] == vocab.sep_id
    assert np.sum(ids == vocab.sep_id) == 2


def test_nsp_drops_single_sentence_documents_and_is_deterministic(
    vocab, features):
  docs, _ = _marker_docs(vocab, 50)
  docs = docs + ['just one line here'] * 5
  a = _run_nsp(docs, features, 32, seed=7)
  b = _run_nsp(docs, features, 32, seed=7)
  assert len(a) == 50
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    assert x['next_sentence_label'] == y['next_sentence_label']


def test_nsp_then_mlm_on_corpus_text(vocab, features):
  docs = ['First line of the doc.\nSecond line follows.\nA third one.',
          'Another document.\nWith two lines.']
  ds = tf.data.Dataset.from_tensor_slices({'text': tf.constant(docs)})
  with seqio.utils.map_seed_manager(0):
    ds = bo.nsp(ds, {'inputs': 32}, features)
    ds = bo.mlm(ds, {'inputs': 32}, features)
  examples = list(ds.as_numpy_iterator())
  assert len(examples) == 2
  assert set(examples[0]) == {'inputs', 'targets', 'segment_ids',
                              'loss_weights', 'next_sentence_label'}


def test_non_wordpiece_vocabulary_is_user_error():
  feats = {'inputs': seqio.Feature(vocabulary=seqio.PassThroughVocabulary(5))}
  ds = tf.data.Dataset.from_tensor_slices({'inputs': [[1, 2, 3]]})
  with pytest.raises(UserError, match='WordPiece'):
    bo.mlm(ds, {'inputs': 8}, feats)
