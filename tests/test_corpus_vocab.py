"""The embedded corpus and the embedded SentencePiece vocabulary."""

import hashlib
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from t5x_lite.data import build_vocab
from t5x_lite.data import corpus
from t5x_lite.data import vocab
from t5x_lite.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(docs):
  return hashlib.sha256('\x00'.join(docs).encode()).hexdigest()


def test_corpus_size_dedup_and_min_length():
  docs = corpus.embedded_documents()
  assert len(docs) > 5000
  assert sum(map(len, docs)) > 1_000_000
  assert len(set(docs)) == len(docs)
  assert min(map(len, docs)) >= corpus.MIN_CHARS
  # pydoc topics come first, in sorted key order.
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  first = sorted(topics.topics)[0]
  assert docs[0] == topics.topics[first].strip() or len(
      topics.topics[first].strip()) < corpus.MIN_CHARS


@pytest.fixture(scope='module')
def fresh_process():
  """(digest of the corpus, whether a GUI / side-effect stdlib module got
  imported) from a new process that builds the corpus."""
  code = ('import hashlib, sys; from t5x_lite.data import corpus; '
          "print(hashlib.sha256('\\x00'.join(corpus.embedded_documents())"
          '.encode()).hexdigest()); '
          "print(any(m in sys.modules for m in ('tkinter', 'turtle', 'antigravity')))")
  env = {k: v for k, v in os.environ.items() if k != corpus.CACHE_ENV}  # from the sources
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0], out[1]


def test_corpus_is_deterministic_in_and_across_processes(fresh_process, monkeypatch, tmp_path):
  docs = corpus.embedded_documents()
  # Built again from the sources (the cache file a process may name, see
  # corpus.CACHE_ENV, does not exist yet), then read back from that file.
  cache = tmp_path / 'corpus.json'
  monkeypatch.setenv(corpus.CACHE_ENV, str(cache))
  for _ in range(2):
    corpus._documents.cache_clear()  # pylint: disable=protected-access
    corpus._split.cache_clear()  # pylint: disable=protected-access
    assert corpus.embedded_documents() == docs
    assert cache.exists()
  assert fresh_process[0] == _digest(docs)


def test_corpus_never_imports_the_stdlib_modules(fresh_process):
  assert fresh_process[1] == 'False'


def test_train_validation_split():
  docs = corpus.embedded_documents()
  train = corpus.split_documents('train')
  valid = corpus.split_documents('validation')
  assert len(train) + len(valid) == len(docs)
  assert not set(train) & set(valid)
  assert 0.01 < len(valid) / len(docs) < 0.04
  with pytest.raises(UserError, match='split'):
    corpus.split_documents('test')


def test_vocab_ids_like_t5():
  v = vocab.embedded_vocabulary()
  assert v.vocab_size == 8100 == 8000 + vocab.EXTRA_IDS
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  assert v.decode([8099]) == '<extra_id_0>'
  assert v.decode([8098]) == '<extra_id_1>'
  assert v.decode([8000]) == '<extra_id_99>'
  assert v.encode('<extra_id_0>') == [8099]
  text = 'Return a new sorted list from the items in iterable.'
  assert v.decode(v.encode(text)) == text


def test_vocab_model_file():
  assert os.path.getsize(vocab.EMBEDDED_VOCAB_PATH) < 1_000_000
  sp = spm.SentencePieceProcessor(model_file=vocab.EMBEDDED_VOCAB_PATH)
  assert sp.get_piece_size() == build_vocab.VOCAB_SIZE == 8000
  assert sp.bos_id() == -1
  assert [sp.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  # byte fallback: characters never seen still round-trip.
  assert sp.decode(sp.encode('\u2603 snowman')) == '\u2603 snowman'


def test_vocab_build_is_reproducible(tmp_path):
  path = build_vocab.build(str(tmp_path / 'v.model'))
  with open(path, 'rb') as a, open(vocab.EMBEDDED_VOCAB_PATH, 'rb') as b:
    assert a.read() == b.read(), (
        'shipped vocabulary differs from a rebuild; run '
        '`python -m t5x_lite.data.build_vocab`')


def test_bpe_vocab_keeps_whitespace_and_rebuilds_identically(tmp_path):
  sp = spm.SentencePieceProcessor(model_file=vocab.EMBEDDED_BPE_VOCAB_PATH)
  assert sp.get_piece_size() == 8000 and sp.bos_id() == -1
  assert [sp.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  # A BPE model (merges), unlike the unigram one.
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  proto = pb.ModelProto.FromString(open(vocab.EMBEDDED_BPE_VOCAB_PATH, 'rb').read())
  assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE
  text = 'def f(x):\n    return  x ** 2\n\n\u2603 done'
  ids = sp.encode(text)
  assert sp.decode(ids) == text
  assert '\u2581\u2581\u2581\u2581' in sp.id_to_piece(ids)  # indentation is a piece
  seq = vocab.embedded_bpe_vocabulary()
  assert seq.vocab_size == 8100 and seq.decode(seq.encode(text)) == text
  path = build_vocab.build(str(tmp_path / 'bpe.model'), model_type='bpe')
  with open(path, 'rb') as a, open(vocab.EMBEDDED_BPE_VOCAB_PATH, 'rb') as b:
    assert a.read() == b.read(), (
        'shipped BPE vocabulary differs from a rebuild; run '
        '`python -m t5x_lite.data.build_vocab --model_type bpe`')


def test_missing_sentencepiece_model_is_a_user_error(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(UserError) as e:
    vocab.sentencepiece_vocabulary(missing)
  assert missing in str(e.value) and '\n' not in str(e.value)
  v = vocab.sentencepiece_vocabulary(vocab.EMBEDDED_VOCAB_PATH, extra_ids=10)
  assert v.vocab_size == 8010
