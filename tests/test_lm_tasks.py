"""GPT (causal / prefix LM) and BART denoising tasks over the embedded corpus."""

import numpy as np
import seqio

import t5x_lite.tasks  # pylint: disable=unused-import
from t5x_lite.data import corpus
from t5x_lite.data import vocab

VOCAB = vocab.embedded_bpe_vocabulary()
EOS = 1


def take(name, lengths, n, seed=0):
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, shuffle=False, seed=seed)
  return list(ds.take(n).as_numpy_iterator())


def doc_stream(num_docs):
  """The first documents of the train split, tokenized, each ended by EOS."""
  ids = []
  for doc in corpus.split_documents('train')[:num_docs]:
    ids += VOCAB.encode(doc) + [EOS]
  return ids


def test_causal_lm_is_the_document_stream_cut_into_full_chunks():
  examples = take('embedded_lm', {'targets': 64}, 40)
  assert {ex['targets'].shape for ex in examples} == {(64,)}
  stream = np.concatenate([ex['targets'] for ex in examples]).tolist()
  expected = doc_stream(60)
  assert stream == expected[:len(stream)]
  assert EOS in stream  # documents are separated by EOS


def test_prefix_lm_splits_contiguous_chunks_at_random_points():
  lengths = {'inputs': 32, 'targets': 48}
  examples = take('embedded_prefix_lm', lengths, 60)
  stream = []
  for ex in examples:
    assert ex['inputs'][-1] == EOS and ex['targets'][-1] == EOS
    assert 2 <= len(ex['inputs']) <= 32 and 2 <= len(ex['targets']) <= 48
    stream += ex['inputs'][:-1].tolist() + ex['targets'][:-1].tolist()
    # Every chunk but the stream's last has max(32, 48) - 1 = 47 tokens.
    assert len(ex['inputs']) + len(ex['targets']) - 2 == 47
  split_points = {len(ex['inputs']) - 1 for ex in examples}
  assert len(split_points) > 10 and max(split_points) <= 31
  # Concatenated without EOS (prefix LM does not mark document ends).
  expected = [t for t in doc_stream(60) if t != EOS]
  assert stream == expected[:len(stream)]


def test_prefix_lm_features_for_the_decoder():
  lengths = {'inputs': 32, 'targets': 48}
  ds = seqio.get_mixture_or_task('embedded_prefix_lm').get_dataset(
      lengths, shuffle=False, seed=0)
  ex = next(seqio.DecoderFeatureConverter(pack=False)(ds, lengths).as_numpy_iterator())
  n_in = int(np.sum(ex['decoder_causal_attention'])) - 1  # one extra position, as seqio
  assert ex['decoder_target_tokens'][n_in - 1] == EOS
  assert not ex['decoder_loss_weights'][:n_in].any() and ex['decoder_loss_weights'][n_in] == 1


def test_bart_denoising_reconstructs_each_document_piece():
  lengths = {'inputs': 128, 'targets': 128}
  examples = take('embedded_bart_denoising', lengths, 50)
  docs = corpus.split_documents('train')
  mask = VOCAB.vocab_size - 1
  masked = 0
  for ex in examples[:3]:  # pieces come in document order
    assert ex['targets'][-1] == EOS
  first = VOCAB.encode(docs[0])
  assert examples[0]['targets'][:-1].tolist() == first[:127]
  for ex in examples:
    original, noised = ex['targets'][:-1], ex['inputs'][:-1]
    assert len(original) <= 127 and ex['inputs'][-1] == EOS
    assert mask not in original
    masked += np.sum(noised == mask)
    # Infilling removes tokens: what is left is a sub-multiset of the original.
    assert len(noised) - np.sum(noised == mask) <= len(original)
  assert masked > 50


def test_bart_noise_schemes_are_chosen_by_gin():
  """The entry point passes gin's arguments in: the dataset is built after the
  gin config is cleared."""
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import settings  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse_gin(['gin/bart_tiny_denoise.gin'],
                        ["bart_noise.bart_denoise.schemes = ['document_rotation']"])
    assert settings.bart_denoise()['schemes'] == ['document_rotation']
    gin.clear_config()
    examples = take('embedded_bart_denoising', {'inputs': 128, 'targets': 128}, 20)
  finally:
    gin.clear_config()
    settings.use()
  rotated = 0
  for ex in examples:
    original, noised = ex['targets'][:-1].tolist(), ex['inputs'][:-1].tolist()
    assert sorted(noised) == sorted(original)  # a rotation: nothing masked or dropped
    k = next(k for k in range(len(original)) if original[k:] + original[:k] == noised)
    rotated += k > 0
  assert rotated >= 15
