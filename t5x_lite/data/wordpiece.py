"""BERT WordPiece vocabularies: the embedded one and users' `vocab.txt` files.

A `vocab.txt` has one token per line; the line number is the id. Continuation
pieces start with `##` (`playing` -> `play ##ing`). The special tokens are
found by their strings, so both layouts work:

    embedded (this module's `build`):  [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    Google's BERT uncased (30522):     [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102
                                       [MASK]=103

The embedded vocabulary `vocab/embedded_wordpiece.txt` is learned on the
train split of the embedded corpus, lower-cased, with tensorflow_text's
WordPiece learner (the one behind `bert_vocab_from_dataset`):

    python -m t5x_lite.data.wordpiece [--vocab_size 8000] [--output PATH]

`WordPieceVocabulary` is a `seqio.Vocabulary`: `encode_tf` runs
`tensorflow_text.BertTokenizer` (BERT's basic split on whitespace and
punctuation, optional lower-casing and accent stripping, then greedy
longest-match WordPiece); `decode` joins `##` pieces to the previous token and
separates the rest by spaces (so punctuation comes back space-separated, as in
BERT), dropping `[PAD]`. There is no EOS (`eos_id` is None): BERT inputs are
framed by `[CLS]` / `[SEP]`, which the preprocessors add.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse
import functools
import os
import time

import seqio
import tensorflow as tf

from t5x_lite.errors import UserError

PAD, UNK, CLS, SEP, MASK = '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'
RESERVED_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_SIZE = 8000
EMBEDDED_WORDPIECE_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'vocab',
    'embedded_wordpiece.txt')

# Learner settings: BERT's lower-casing and a small alphabet so that rare
# characters (CJK, symbols in docstrings) become [UNK] rather than eat the
# vocabulary.
LEARN_PARAMS = dict(upper_thresh=10_000_000, lower_thresh=2, num_iterations=4,
                    max_unique_chars=300, max_token_length=30)


def _read_tokens(path):
  path = os.fspath(path)
  if not tf.io.gfile.exists(path):
    raise UserError(
        f'WordPiece vocab.txt not found: {path}; pass the path of an existing '
        'vocab.txt (one token per line) or build the embedded one with '
        '`python -m t5x_lite.data.wordpiece`.')
  with tf.io.gfile.GFile(path, 'r') as f:
    tokens = [line.rstrip('\r\n') for line in f]
  while tokens and not tokens[-1]:
    tokens.pop()
  return tokens


class WordPieceVocabulary(seqio.Vocabulary):
  """A seqio vocabulary over a BERT `vocab.txt` (see the module docstring).

  Args:
    path: the `vocab.txt` (local or any tf.io.gfile path).
    lower_case: lower-case and strip accents before splitting (True for
      uncased vocabularies, ours included).
  """

  def __init__(self, path, lower_case=True):
    self._path = os.fspath(path)
    self._lower_case = bool(lower_case)
    self._tokens = _read_tokens(self._path)
    self._ids = {}
    for i, token in enumerate(self._tokens):
      self._ids.setdefault(token, i)
    missing = [t for t in (PAD, UNK, CLS, SEP, MASK) if t not in self._ids]
    if missing:
      raise UserError(
          f'WordPiece vocab {self._path} lacks special token(s) '
          f'{", ".join(missing)}; a BERT vocab.txt needs [PAD], [UNK], [CLS], '
          '[SEP] and [MASK].')
    self._tokenizer = None
    super().__init__(extra_ids=0)

  # -- special ids --------------------------------------------------------

  @property
  def path(self):
    return self._path

  @property
  def lower_case(self):
    return self._lower_case

  @property
  def tokens(self):
    """The vocabulary, a list indexed by id."""
    return list(self._tokens)

  @property
  def pad_id(self):
    return self._ids[PAD]

  @property
  def unk_id(self):
    return self._ids[UNK]

  @property
  def cls_id(self):
    return self._ids[CLS]

  @property
  def sep_id(self):
    return self._ids[SEP]

  @property
  def mask_id(self):
    return self._ids[MASK]

  @property
  def eos_id(self):
    return None

  @property
  def special_ids(self):
    """Ids of every `[...]` token (specials and BERT's `[unusedN]` slots)."""
    return sorted(i for t, i in self._ids.items()
                  if t.startswith('[') and t.endswith(']') and len(t) > 2)

  def token_to_id(self, token):
    return self._ids.get(token, self.unk_id)

  def id_to_token(self, i):
    return self._tokens[i] if 0 <= i < len(self._tokens) else UNK

  @property
  def _base_vocab_size(self):
    return len(self._tokens)

  # -- python ---------------------------------------------------------------

  def _encode(self, s):
    return self._encode_tf(tf.constant(s, tf.string)).numpy().tolist()

  def _decode(self, ids):
    words = []
    for i in ids:
      i = int(i)
      if i == self.pad_id:
        continue
      token = self.id_to_token(i)
      if token.startswith('##') and words:
        words[-1] += token[2:]
      else:
        words.append(token)
    return ' '.join(words)

  # -- tensorflow -------------------------------------------------------------

  @property
  def tf_tokenizer(self):
    """The `tensorflow_text.BertTokenizer` (created once, eagerly)."""
    if self._tokenizer is None:
      import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
      with tf.init_scope():
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self._tokens),
                tf.range(len(self._tokens), dtype=tf.int64)),
            num_oov_buckets=1)
        self._tokenizer = tf_text.BertTokenizer(
            table, token_out_type=tf.int64, unknown_token=UNK,
            lower_case=self._lower_case)
    return self._tokenizer

  def _encode_tf(self, s):
    s = tf.convert_to_tensor(s, tf.string)
    scalar = s.shape.rank == 0
    ids = self.tf_tokenizer.tokenize(tf.reshape(s, [-1]))  # [b, words, pieces]
    ids = tf.cast(ids.merge_dims(1, 2), tf.int32)
    return ids[0] if scalar else ids

  def _decode_tf(self, ids):
    ids = tf.convert_to_tensor(ids, tf.int32)
    table = tf.constant(self._tokens)
    ids = tf.where((ids >= 0) & (ids < len(self._tokens)), ids, self.unk_id)
    pieces = tf.where(ids == self.pad_id, '', tf.gather(table, ids))
    text = tf.strings.reduce_join(pieces, axis=-1, separator=' ')
    text = tf.strings.regex_replace(text, ' +##', '')
    text = tf.strings.regex_replace(text, ' +', ' ')
    return tf.strings.strip(text)

  def __eq__(self, other):
    return (isinstance(other, WordPieceVocabulary) and
            self._tokens == other._tokens and
            self._lower_case == other._lower_case)

  def __hash__(self):
    return hash((len(self._tokens), tuple(self._tokens[:16]),
                 self._lower_case))

  def __repr__(self):
    return (f'WordPieceVocabulary({self._path!r}, '
            f'lower_case={self._lower_case}, size={len(self._tokens)})')


def wordpiece_vocabulary(path, lower_case=True):
  """A `WordPieceVocabulary` over `path`; UserError if it does not exist."""
  return WordPieceVocabulary(path, lower_case=lower_case)


@functools.cache
def embedded_wordpiece_vocabulary():
  """The lower-cased WordPiece vocabulary learned on the embedded corpus."""
  if not os.path.exists(EMBEDDED_WORDPIECE_PATH):
    raise UserError(
        f'Embedded WordPiece vocabulary missing at {EMBEDDED_WORDPIECE_PATH}; '
        'rebuild it with `python -m t5x_lite.data.wordpiece`.')
  return WordPieceVocabulary(EMBEDDED_WORDPIECE_PATH, lower_case=True)


# ----------------------------------------------------------------------------
# Building the embedded vocabulary.


def training_lines():
  """Non-empty lines of the train split of the embedded corpus."""
  from t5x_lite.data import corpus  # pylint: disable=g-import-not-at-top
  for doc in corpus.split_documents('train'):
    for line in doc.splitlines():
      line = line.strip()
      if line:
        yield line


def build(output_path=EMBEDDED_WORDPIECE_PATH, vocab_size=VOCAB_SIZE):
  """Learns a lower-cased WordPiece vocab on the corpus; writes `vocab.txt`.

  The reserved tokens come first ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4),
  then single characters, then the learned pieces by count.

  Returns:
    `output_path`.
  """
  from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bvd  # pylint: disable=g-import-not-at-top
  lines = list(training_lines())
  dataset = tf.data.Dataset.from_tensor_slices(tf.constant(lines)).batch(4096)
  vocab = bvd.bert_vocab_from_dataset(
      dataset, vocab_size=vocab_size, reserved_tokens=list(RESERVED_TOKENS),
      bert_tokenizer_params=dict(lower_case=True), learn_params=LEARN_PARAMS)
  os.makedirs(os.path.dirname(output_path) or '.', exist_ok=True)
  with open(output_path, 'w', encoding='utf-8') as f:
    for token in vocab:
      f.write(token + '\n')
  return output_path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', default=EMBEDDED_WORDPIECE_PATH)
  parser.add_argument('--vocab_size', type=int, default=VOCAB_SIZE)
  args = parser.parse_args(argv)
  start = time.time()
  path = build(args.output, args.vocab_size)
  with open(path, encoding='utf-8') as f:
    size = sum(1 for _ in f)
  print(f'wrote {path} ({size} tokens, {os.path.getsize(path)} bytes) in '
        f'{time.time() - start:.1f}s')


if __name__ == '__main__':
  main()
