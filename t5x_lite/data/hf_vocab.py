"""Hugging Face tokenizer directories as seqio vocabularies.

`HfTokenizerVocabulary(directory)` reads what `save_pretrained` writes for a
tokenizer, through the `tokenizers` library (no transformers, no torch):

  tokenizer.json               the whole pipeline (normaliser, pre-tokeniser,
                               model, decoder, added tokens); or else
  vocab.json + merges.txt      a byte-level BPE as GPT-2, RoBERTa and BART
                               save it, built as transformers' GPT2Tokenizer
                               builds it (ByteLevel pre-tokeniser and decoder,
                               `add_prefix_space` from the config);
  tokenizer_config.json        the special tokens (`eos_token`, `unk_token`,
  special_tokens_map.json      ..., `added_tokens_decoder`) and
  added_tokens.json            `clean_up_tokenization_spaces`.

It behaves as `transformers.AutoTokenizer.from_pretrained(directory)` does:
`encode(text)` gives `tokenizer(text, add_special_tokens=False).input_ids`
(seqio appends EOS itself), and `decode(ids)` gives
`tokenizer.decode(ids, skip_special_tokens=True)` of the ids up to the first
EOS, so EOS, padding and other special tokens do not reach the text.
tokenizer.json is used as saved. transformers 5 rebuilds the normaliser and
pre-tokeniser of some classes (T5Tokenizer, LlamaTokenizer, Qwen2Tokenizer,
...) from the class instead; a tokenizer.json that the class saved agrees
with that, but one made otherwise and labelled with such a class in
tokenizer_config.json may not.

Ids: `vocab_size` is the tokenizer's full size, added tokens included (no
extra ids on top). `eos_id` is the id of `eos_token`, or of `sep_token` for
tokenizers without one (BERT's [SEP]); `unk_id` that of `unk_token`; `bos_id`
that of `bos_token` (None where a token is not set). `cls_id`, `sep_id`,
`mask_id` and `special_ids`, which BERT's objectives and BART's noise use,
exist where the tokenizer sets those tokens.

Padding. seqio and every feature converter pad with id 0 and take id 0 for
padding: loss weights are `targets != 0`, the models' attention masks treat
`tokens > 0` as the real positions and decoder inputs start with 0. That is
right where id 0 is the tokenizer's padding token (BERT's [PAD], T5's <pad>)
and harmless where it is a special token that text does not produce (BART's
<s>: encode adds no special tokens). Where id 0 is an ordinary token, as
GPT-2's '!' (`zero_is_text` is True), the ids are not renumbered (that would
need another embedding table): encode gives id 0 for '!' exactly as Hugging
Face does, and then
  - seqio's own feature converters give a '!' target loss weight 0, and the
    model masks the position that predicts it from attention as padding.
    `ZeroIsTextDecoderFeatureConverter` (below) gives the real tokens' loss
    weights and a `decoder_attention_mask` instead; `import_hf` binds it for
    an imported decoder-only model (LM and prefix-LM tasks). A run whose gin
    binds another converter (instruction, preference, classification gins)
    and encoder-decoder models keep seqio's reading of 0;
  - decoder inputs start with id 0 (seqio's BOS), which the model reads as
    '!';
  - `decode` cannot tell trailing padding from '!': it cuts at the first EOS
    (as seqio's contract says, so padding after EOS never shows), but ids
    without an EOS decode their padding as '!!'. `decode_tf` cuts at EOS
    too, without seqio's substitution of 0 after it.
Text without '!' is unaffected.
"""

import json
import os
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.errors import UserError

TOKENIZER_JSON = 'tokenizer.json'
VOCAB_JSON = 'vocab.json'
MERGES_TXT = 'merges.txt'
TOKENIZER_CONFIG = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP = 'special_tokens_map.json'
ADDED_TOKENS = 'added_tokens.json'
# Every file of a tokenizer directory that this module reads (import_hf copies them).
FILES = (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, TOKENIZER_CONFIG,
         SPECIAL_TOKENS_MAP, ADDED_TOKENS)
ROLES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
         'cls_token', 'mask_token')
SOUGHT = f'{TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT}'


def tokenizer_files(directory: str) -> list[str]:
  """The names of the tokenizer files in `directory` ([] if it has no
  tokenizer.json and no vocab.json + merges.txt)."""
  present = [f for f in FILES if os.path.isfile(os.path.join(directory, f))]
  if TOKENIZER_JSON in present or {VOCAB_JSON, MERGES_TXT} <= set(present):
    return present
  return []


def _read_json(path: str):
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise UserError(f'{path} is not valid JSON ({e}); save the tokenizer again '
                    'with save_pretrained.') from None


def _content(token) -> Optional[str]:
  """A special token as configs write it: a string, or {'content': ...}."""
  if isinstance(token, dict):
    return token.get('content')
  return token if isinstance(token, str) else None


def _added_token(entry):
  """An `AddedToken` from a special token or an `added_tokens_decoder` entry."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  if isinstance(entry, str):
    return tokenizers.AddedToken(entry, special=True, normalized=False)
  flags = {k: entry[k] for k in ('single_word', 'lstrip', 'rstrip', 'normalized', 'special')
           if k in entry}
  return tokenizers.AddedToken(entry['content'], **flags)


def _byte_level_bpe(vocab_path: str, merges_path: str, add_prefix_space: bool):
  """GPT-2's tokenizer from its two files, as transformers builds it."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  try:
    bpe = models.BPE.from_file(vocab_path, merges_path, dropout=None,
                               continuing_subword_prefix='', end_of_word_suffix='',
                               fuse_unk=False)
  except Exception as e:  # the Rust reader's own exception type
    raise UserError(f'cannot read {vocab_path} + {merges_path} as byte-level BPE '
                    f'files ({e}); save the tokenizer again with save_pretrained.') from None
  tokenizer = tokenizers.Tokenizer(bpe)
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def _add_token(tokenizer, directory: str, added, token_id: Optional[int] = None):
  """Adds `added` unless the tokenizer has it as an added token already; a
  stated `token_id` must be the id it gets."""
  if added.content in {t.content for t in tokenizer.get_added_tokens_decoder().values()}:
    return
  expected = tokenizer.token_to_id(added.content)
  if expected is None:
    expected = tokenizer.get_vocab_size(with_added_tokens=True)
  if token_id is not None and token_id != expected:
    raise UserError(f'{directory}: added token {added.content!r} has id {token_id} but '
                    f'would get id {expected}; save the tokenizer again with save_pretrained.')
  (tokenizer.add_special_tokens if added.special else tokenizer.add_tokens)([added])


def _read_tokenizer(directory: str, config: dict):
  """The `tokenizers.Tokenizer` of the directory's files, with the added
  tokens its config declares (truncation and padding off)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  path = lambda name: os.path.join(directory, name)
  if os.path.isfile(path(TOKENIZER_JSON)):
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path(TOKENIZER_JSON))
    except Exception as e:  # the Rust reader's own exception type
      raise UserError(f'cannot read {path(TOKENIZER_JSON)} ({e}); save the '
                      'tokenizer again with a current tokenizers library.') from None
  else:
    tokenizer = _byte_level_bpe(path(VOCAB_JSON), path(MERGES_TXT),
                                bool(config.get('add_prefix_space', False)))
  # A saved tokenizer.json may truncate or pad; transformers does neither
  # unless asked, and seqio trims and pads itself.
  tokenizer.no_truncation()
  tokenizer.no_padding()
  # Added tokens the files declare, in id order (they may be new to the model):
  # tokenizer_config.json's added_tokens_decoder, older directories' added_tokens.json.
  declared = [(int(i), _added_token(entry))
              for i, entry in (config.get('added_tokens_decoder') or {}).items()]
  declared += [(int(i), tokenizers.AddedToken(token, special=False))
               for token, i in _read_json(path(ADDED_TOKENS)).items()]
  for token_id, added in sorted(declared, key=lambda pair: pair[0]):
    _add_token(tokenizer, directory, added, token_id)
  return tokenizer


def _text(s) -> str:
  """A string as tf.numpy_function hands it over (bytes, or a 0-d array)."""
  if isinstance(s, np.ndarray):
    s = s.item()
  return s.decode('utf-8', errors='replace') if isinstance(s, bytes) else str(s)


class HfTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face tokenizer directory as a seqio vocabulary (see the module
  docstring for the files read, the ids and the padding caveat)."""

  def __init__(self, directory: str):
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
      raise UserError(f'tokenizer directory not found: {directory}; pass a directory '
                      f'holding {SOUGHT} (what save_pretrained writes).')
    if not tokenizer_files(directory):
      raise UserError(f'{directory} holds no Hugging Face tokenizer: sought {SOUGHT} '
                      f'(with {TOKENIZER_CONFIG} for the special tokens); save one '
                      'there with save_pretrained.')
    self._directory = directory
    config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
    tokenizer = _read_tokenizer(directory, config)
    # The special tokens by role: tokenizer_config.json, else special_tokens_map.json.
    special_map = _read_json(os.path.join(directory, SPECIAL_TOKENS_MAP))
    self._special = {}
    for role in ROLES:
      token = _content(config.get(role)) or _content(special_map.get(role))
      if token is not None:
        _add_token(tokenizer, directory, _added_token(token))
        self._special[role] = token
    self._tokenizer = tokenizer
    self._config_json = tokenizer.to_str()
    self._role_ids = {role: tokenizer.token_to_id(t) for role, t in self._special.items()}
    self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items()
                         if t.special}
    # transformers skips its space clean-up for BPE models unless told not to.
    flag = 'clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output'
    model_type = json.loads(self._config_json)['model'].get('type')
    self._clean_up = bool(config.get('clean_up_tokenization_spaces', False)) and (
        model_type != 'BPE' or bool(config.get(flag, False)))
    super().__init__(extra_ids=0)

  @property
  def directory(self) -> str:
    """The tokenizer directory read (its files are what an export copies)."""
    return self._directory

  # -- ids ------------------------------------------------------------------

  @property
  def tokenizer(self):
    """The `tokenizers.Tokenizer` (special tokens of the config added)."""
    return self._tokenizer

  @property
  def special_tokens(self) -> dict[str, str]:
    """Role (e.g. 'eos_token') -> token string, for the roles the files set."""
    return dict(self._special)

  @property
  def eos_id(self) -> Optional[int]:
    eos = self._role_ids.get('eos_token')
    return eos if eos is not None else self._role_ids.get('sep_token')

  @property
  def unk_id(self) -> Optional[int]:
    return self._role_ids.get('unk_token')

  @property
  def bos_id(self) -> Optional[int]:
    return self._role_ids.get('bos_token')

  def _role_id(self, role: str) -> int:
    token_id = self._role_ids.get(role)
    if token_id is None:  # so hasattr() is False, as for vocabularies without it
      raise AttributeError(f'{self!r} has no {role}')
    return token_id

  # The ids BERT's objectives and BART's noise ask a vocabulary for (absent
  # attributes where the tokenizer does not set the token).
  cls_id = property(lambda self: self._role_id('cls_token'))
  sep_id = property(lambda self: self._role_id('sep_token'))
  mask_id = property(lambda self: self._role_id('mask_token'))

  @property
  def special_ids(self) -> list[int]:
    """Ids of every special token (never masked by BERT's MLM)."""
    return sorted(self._special_ids)

  @property
  def hf_pad_id(self) -> Optional[int]:
    """The tokenizer's own padding id (seqio pads with `pad_id` 0 regardless)."""
    return self._role_ids.get('pad_token')

  @property
  def zero_is_text(self) -> bool:
    """Whether id 0 is an ordinary token that text encodes to (GPT-2's '!'),
    which seqio's padding collides with (see the module docstring)."""
    return 0 not in self._special_ids

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  # -- python ---------------------------------------------------------------

  def _encode(self, s: str) -> Sequence[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    size = self._base_vocab_size
    ids = [i for i in (int(i) for i in ids) if 0 <= i < size]  # -1: cut off (decode_tf)
    text = self._tokenizer.decode(ids, skip_special_tokens=True)
    if self._clean_up:  # transformers' clean_up_tokenization
      for before, after in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','),
                            (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text

  # -- tensorflow (through the python path: tokenizers has no TF ops) -------

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """A scalar string -> [n] int32 ids; strings of rank >= 1 -> ragged ids."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank == 0:
      ids = tf.numpy_function(self._encode_one, [s], tf.int32, stateful=False)
      ids.set_shape([None])
      return ids
    values, lengths = tf.numpy_function(self._encode_many, [tf.reshape(s, [-1])],
                                        [tf.int32, tf.int64], stateful=False)
    values.set_shape([None])
    ids = tf.RaggedTensor.from_row_lengths(values, tf.reshape(lengths, [-1]))
    for size in reversed(s.shape[1:]):  # back to the strings' shape
      ids = tf.RaggedTensor.from_uniform_row_length(ids, size)
    return ids

  def _encode_one(self, s) -> np.ndarray:
    return np.asarray(self._encode(_text(s)), np.int32)

  def _encode_many(self, strings: np.ndarray):
    encoded = self._tokenizer.encode_batch([_text(s) for s in strings.tolist()],
                                           add_special_tokens=False)
    lengths = np.asarray([len(e.ids) for e in encoded], np.int64)
    values = np.asarray([i for e in encoded for i in e.ids], np.int32)
    return values, lengths

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """[..., n] ids -> [...] strings (negative ids are left out)."""
    ids = tf.convert_to_tensor(ids)
    if ids.dtype != tf.int32:
      ids = tf.cast(ids, tf.int32)
    shape = tf.shape(ids)
    rows = tf.reshape(ids, [tf.reduce_prod(shape[:-1]), shape[-1]])
    text = tf.numpy_function(
        lambda x: np.asarray([self._decode(row).encode('utf-8') for row in x.tolist()],
                             object), [rows], tf.string, stateful=False)
    return tf.reshape(text, shape[:-1])

  def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """seqio's decode_tf, but what follows the first EOS is dropped rather
    than replaced by id 0 (a real token in some tokenizers)."""
    ids = tf.convert_to_tensor(ids)
    if ids.shape == (0,):
      return tf.constant(b'', dtype=tf.string)
    ids = tf.cast(ids, tf.int32)
    if self.unk_id is not None:
      ids = tf.where(ids < self._base_vocab_size, ids, self.unk_id)
    if self.eos_id is not None:
      after_eos = tf.cumsum(tf.cast(tf.equal(ids, self.eos_id), tf.int32),
                            exclusive=True, axis=-1)
      ids = tf.where(after_eos > 0, -1, ids)
    return self._decode_tf(ids)

  # -- identity -------------------------------------------------------------

  def __eq__(self, other):
    return (isinstance(other, HfTokenizerVocabulary) and
            self._config_json == other._config_json and
            self._role_ids == other._role_ids and self._clean_up == other._clean_up)

  def __hash__(self):
    return hash((self._config_json, tuple(sorted(self._role_ids.items()))))

  def __repr__(self):
    return f'HfTokenizerVocabulary({self._directory!r}, size={self.vocab_size})'


class ZeroIsTextDecoderFeatureConverter:
  """`seqio.DecoderFeatureConverter` for a vocabulary whose id 0 is a token
  (`zero_is_text`, GPT-2's '!'): what it gives for the same text with a
  vocabulary whose id 0 is free, plus `decoder_attention_mask`.

  Every id of 'inputs' / 'targets' goes up by one before seqio's converter
  trims, packs and pads (so only padding is 0 there) and down by one after.
  Loss weights, segment ids, positions and prefix-LM attention are then
  those of the real tokens, '!' included, and `decoder_attention_mask` (1 on
  real tokens) tells the decoder model the real positions in place of
  `decoder_target_tokens > 0`. Decoder inputs still start with 0 (BOS), as
  in every seqio pipeline. `import_hf` binds it as an imported decoder-only
  model's `feature_converter_cls` when its tokenizer has this collision.
  """

  TOKEN_FEATURES = ('inputs', 'targets')

  def __init__(self, pack: bool = True, **kwargs):
    self._inner = seqio.DecoderFeatureConverter(pack=pack, **kwargs)
    self.pack = pack

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths) -> tf.data.Dataset:
    def up(ex):
      return {k: v + 1 if k in self.TOKEN_FEATURES else v for k, v in ex.items()}

    def down(ex):
      ex = dict(ex)
      ex['decoder_attention_mask'] = tf.cast(ex['decoder_target_tokens'] > 0, tf.int32)
      for k in ('decoder_target_tokens', 'decoder_input_tokens'):
        ex[k] = tf.maximum(ex[k] - 1, 0)
      return ex

    ds = ds.map(up, num_parallel_calls=tf.data.AUTOTUNE)
    ds = self._inner(ds, task_feature_lengths)
    return ds.map(down, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    lengths = dict(self._inner.get_model_feature_lengths(task_feature_lengths))
    lengths['decoder_attention_mask'] = lengths['decoder_target_tokens']
    return lengths
