"""hf.tokenizer_files: our vocabularies exported as Hugging Face tokenizer files.

Each export is loaded with `transformers.AutoTokenizer` (the reference) and
compared with our vocabulary on held-out text: every line of the shared
WikiText-2 test file and hand-written lines (accents, emoji, tabs, whitespace
runs, CJK, characters outside the vocabulary). The figures (lines, lines with
equal ids) are printed; run with -s to see them.
"""

import ast
import io
import json
import os
import re
import unicodedata

import pytest
import seqio
import sentencepiece as spm

from conftest import REPO, require, require_shared_data
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError
from t5x_lite.hf import tokenizer_files

transformers = require('transformers')

HAND_WRITTEN = [
    'Café naïve résumé Ångström façade', 'Crème brûlée à la carte, s\'il vous plaît.',
    'emoji 😀🎉 here 👍🏽 and ❤️', 'tab\tseparated\tvalues\t', '  many    spaces   between  ',
    'new\nlines\r\nand\x0bcontrols\x00\x01', '中文字符 日本語のテキスト 한국어 문장',
    'Ünïcödé ſ ß ﬁ Ｆｕｌｌｗｉｄｔｈ ½ ²', 'mathematical 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ΣΑΣ Σίσυφος İstanbul',
    'rare: ☃ ⌘ ∮ 𓀀 \u200b zero\u200dwidth \ufeffbom', 'code: def f(x): return {x: [1, 2]}  # ok',
    '', ' ', 'literal specials </s> <pad> <unk> [CLS] [MASK] <0x41>',
]
SENTINEL_TEXT = 'The <extra_id_0> walks in <extra_id_1> park <extra_id_99> .'


def _lines(path):
  """The file's lines (split at '\\n' only: the text keeps any other control character)."""
  with open(path, encoding='utf-8', newline='') as f:
    text = f.read()
  return text[:-1].split('\n') if text.endswith('\n') else text.split('\n')


@pytest.fixture(scope='module')
def wikitext():
  return _lines(require_shared_data('text', 'wikitext-2', 'test.txt'))


def _export(vocabulary, directory, model_type, with_config=True):
  ids = tokenizer_files.save(vocabulary, str(directory), model_type=model_type)
  if with_config:  # what export_hf writes beside the tokenizer files
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump({'model_type': model_type}, f)
  return ids, transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """{name: (our vocabulary, returned ids, AutoTokenizer)}, built once."""
  root = tmp_path_factory.mktemp('hf_tokenizers')
  out = {}
  for name, vocabulary, model_type in (
      ('unigram-t5', vocab_lib.embedded_vocabulary(), 't5'),
      ('bpe-gpt2', vocab_lib.embedded_bpe_vocabulary(), 'gpt2'),
      ('bpe-bart', vocab_lib.embedded_bpe_vocabulary(), 'bart'),
      ('wordpiece-bert', wordpiece.embedded_wordpiece_vocabulary(), 'bert')):
    out[name] = (vocabulary, *_export(vocabulary, root / name, model_type))
  return out


@pytest.fixture(scope='module')
def wordpiece_held_out(exports, wikitext):
  """(texts, our ids) for the WordPiece tests: one TF call, shared."""
  texts = wikitext + HAND_WRITTEN
  return texts, _ours(exports['wordpiece-bert'][0], texts)


def _ours(vocabulary, texts):
  if isinstance(vocabulary, wordpiece.WordPieceVocabulary):  # one TF call for the batch
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return vocabulary.encode_tf(tf.constant(texts)).to_list()
  return [list(vocabulary.encode(t)) for t in texts]


def _count_equal(name, ours, theirs, what):
  equal = sum(a == b for a, b in zip(ours, theirs))
  print(f'{name}: {what}: {equal} of {len(ours)} lines equal')
  return equal


# ----------------------------------------------------------------------------
# SentencePiece (unigram for T5, BPE for GPT-2 and BART).

SP = ('unigram-t5', 'bpe-gpt2', 'bpe-bart')


@pytest.mark.parametrize('name', SP)
def test_sentencepiece_ids_equal_on_held_out_text(exports, wikitext, name):
  vocabulary, _, tok = exports[name]
  assert type(tok).__name__ == 'TokenizersBackend'  # tokenizer.json as written
  for what, texts in (('WikiText-2 test', wikitext), ('hand-written', HAND_WRITTEN)):
    ours = _ours(vocabulary, texts)
    theirs = tok(texts, add_special_tokens=False)['input_ids']
    equal = _count_equal(name, ours, theirs, what)
    assert equal == len(texts), [t for t, a, b in zip(texts, ours, theirs) if a != b][:5]
  # Byte fallback: characters outside the vocabulary become their UTF-8 bytes.
  assert tok.convert_ids_to_tokens(tok('☃', add_special_tokens=False)['input_ids'])[-3:] == [
      '<0xE2>', '<0x98>', '<0x83>']


@pytest.mark.parametrize('name', SP)
def test_sentencepiece_decode_equals_ours(exports, wikitext, name):
  vocabulary, _, tok = exports[name]
  texts = wikitext + HAND_WRITTEN + [SENTINEL_TEXT]
  ids = _ours(vocabulary, texts)
  ours = [vocabulary.decode(i) for i in ids]
  theirs = tok.batch_decode(ids)
  equal = _count_equal(name, ours, theirs, 'decode of our ids')
  assert equal == len(texts), [(a, b) for a, b in zip(ours, theirs) if a != b][:3]


@pytest.mark.parametrize('name', SP)
def test_sentencepiece_special_and_sentinel_ids(exports, name):
  vocabulary, ids, tok = exports[name]
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (
      0, 1, 2, None)
  assert len(tok) == vocabulary.vocab_size == 8100
  for n in range(100):  # <extra_id_0> = 8099 ... <extra_id_99> = 8000, as in seqio
    assert tok.convert_tokens_to_ids(f'<extra_id_{n}>') == 8099 - n
    assert tok.convert_ids_to_tokens(8099 - n) == f'<extra_id_{n}>'
  # A sentinel written as a word in text is its id, as for seqio.
  assert tok(SENTINEL_TEXT, add_special_tokens=False)['input_ids'] == list(
      vocabulary.encode(SENTINEL_TEXT))
  assert 8099 in tok(SENTINEL_TEXT)['input_ids']
  # Special tokens around a sequence: T5 and BART inputs end with EOS, GPT-2's not.
  body = list(vocabulary.encode('Hello world'))
  family = name.split('-')[1]
  assert tok('Hello world')['input_ids'] == body + ([1] if family != 'gpt2' else [])
  expected = {'pad_token_id': 0, 'eos_token_id': 1, 'unk_token_id': 2,
              'bos_token_id': 0 if family == 'gpt2' else None}
  if family in ('t5', 'bart'):
    expected['decoder_start_token_id'] = 0
  if family == 'bart':
    expected['mask_token_id'] = 8099
  assert ids == expected


def test_sentencepiece_decode_of_special_ids(exports):
  """Where decoding cannot equal ours: seqio stops at EOS and drops pad, writes
  unk as ' ⁇ '; HF writes the special tokens, or drops them all with
  skip_special_tokens=True."""
  vocabulary, _, tok = exports['unigram-t5']
  hello = list(vocabulary.encode('Hello world'))
  ids = [0] + hello + [8099] + hello + [1] + hello
  assert vocabulary.decode(ids) == 'Hello world <extra_id_0> Hello world'
  assert tok.decode(ids) == '<pad> Hello world <extra_id_0> Hello world</s> Hello world'
  assert tok.decode(ids[:ids.index(1)], skip_special_tokens=True) == vocabulary.decode(ids)
  assert vocabulary.decode(hello + [2]) == 'Hello world ⁇ '
  assert tok.decode(hello + [2]) == 'Hello world<unk>'


def test_spiece_model_and_t5_tokenizer(exports, tmp_path):
  """spiece.model is our model without the sentinels; T5Tokenizer (which
  transformers 5 rebuilds without byte fallback) gets the sentinel ids and
  equal ids wherever no byte fallback is needed."""
  vocabulary, _, _ = exports['unigram-t5']
  tokenizer_files.save(vocabulary, str(tmp_path), model_type='t5')
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'spiece.model'))
  assert sp.get_piece_size() == 8000
  text = HAND_WRITTEN[0] + ' ' + HAND_WRITTEN[6]
  assert sp.encode(text) == list(vocabulary.encode(text))
  t5 = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
  assert t5.convert_tokens_to_ids(['<extra_id_0>', '<extra_id_99>']) == [8099, 8000]
  assert t5('The quick brown fox.')['input_ids'] == list(vocabulary.encode('The quick brown fox.')) + [1]


def test_loads_without_config_json(tmp_path):
  """AutoTokenizer needs only the tokenizer files (no config.json)."""
  vocabulary = vocab_lib.embedded_bpe_vocabulary()
  _, tok = _export(vocabulary, tmp_path, 'bart', with_config=False)
  assert sorted(os.listdir(tmp_path)) == ['special_tokens_map.json', 'spiece.model',
                                           'tokenizer.json', 'tokenizer_config.json']
  assert tok(HAND_WRITTEN[2], add_special_tokens=False)['input_ids'] == list(
      vocabulary.encode(HAND_WRITTEN[2]))


def _train_user_model(tmp_path, model_type, lines):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=500,
      model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  path = tmp_path / f'user_{model_type}.model'
  path.write_bytes(model.getvalue())
  return seqio.SentencePieceVocabulary(str(path), extra_ids=10)


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_user_sentencepiece_model_without_byte_fallback(tmp_path, wikitext, model_type):
  """A user's model (no byte fallback, so unknown characters are unk).

  Documented difference: a Unigram vocabulary holds the control pieces
  (`<unk>` ...) as pieces, and where a literal `<unk>` in the text has a
  character outside the vocabulary, Hugging Face's Unigram takes the piece and
  SentencePiece takes unk + the known characters. Every other line is equal.
  """
  train = [l for l in _lines(require_shared_data('text', 'wikitext-2', 'valid.txt')) if l.strip()]
  vocabulary = _train_user_model(tmp_path, model_type, train[:600])
  _, tok = _export(vocabulary, tmp_path / 'export', 't5')
  texts = wikitext + HAND_WRITTEN
  ours = _ours(vocabulary, texts)
  theirs = tok(texts, add_special_tokens=False)['input_ids']
  _count_equal(f'user {model_type}', ours, theirs, 'WikiText-2 test + hand-written')
  unequal = [t for t, a, b in zip(texts, ours, theirs) if a != b]
  if model_type == 'bpe':
    assert not unequal
  else:
    assert all(re.search('<unk>|</s>|<pad>', t) for t in unequal), unequal[:3]
  assert tok.convert_tokens_to_ids('<extra_id_0>') == vocabulary.vocab_size - 1


# ----------------------------------------------------------------------------
# WordPiece (BERT).


def _as_tf_text_normalises(text):
  """ICU's NFKC case folding, and vertical tab / form feed as spaces (BERT's
  normaliser deletes them as control characters, tensorflow_text splits there)."""
  text = unicodedata.normalize('NFKC', unicodedata.normalize('NFKC', text).casefold())
  return text.replace('\x0b', ' ').replace('\x0c', ' ')


def test_wordpiece_ids(exports, wordpiece_held_out):
  """BertTokenizer equals ours except where ICU's NFKC case folding (ours,
  tensorflow_text) differs from lower-casing (BERT's normaliser), and at vertical
  tabs / form feeds: with the text normalised as tensorflow_text does first,
  every line is equal."""
  vocabulary, _, tok = exports['wordpiece-bert']
  assert type(tok).__name__ == 'BertTokenizer' and tok.do_lower_case
  texts, ours = wordpiece_held_out
  theirs = tok(texts, add_special_tokens=False)['input_ids']
  equal = _count_equal('wordpiece-bert', ours, theirs, 'WikiText-2 test + hand-written')
  unequal = [t for t, a, b in zip(texts, ours, theirs) if a != b]
  assert equal >= len(texts) - 5 and 'Ünïcödé ſ ß ﬁ Ｆｕｌｌｗｉｄｔｈ ½ ²' in unequal
  folded = tok([_as_tf_text_normalises(t) for t in texts], add_special_tokens=False)['input_ids']
  assert _count_equal('wordpiece-bert', ours, folded, 'normalised as tensorflow_text does') == len(texts)


def test_cased_wordpiece_ids(tmp_path, wordpiece_held_out):
  """do_lower_case=False: equal except at vertical tab / form feed and, cased
  only, format characters (zero-width joiner ...): tensorflow_text splits
  there, BERT's normaliser deletes them."""
  cased = wordpiece.WordPieceVocabulary(wordpiece.EMBEDDED_WORDPIECE_PATH, lower_case=False)
  _, tok = _export(cased, tmp_path, 'bert')
  assert not tok.do_lower_case
  texts = wordpiece_held_out[0]
  ours = _ours(cased, texts)
  theirs = tok(texts, add_special_tokens=False)['input_ids']
  equal = _count_equal('cased wordpiece-bert', ours, theirs, 'WikiText-2 test + hand-written')
  assert equal >= len(texts) - 3
  split = [''.join(' ' if c in '\x0b\x0c' or unicodedata.category(c) == 'Cf' else c for c in t)
           for t in texts]
  theirs = tok(split, add_special_tokens=False)['input_ids']
  assert _count_equal('cased wordpiece-bert', ours, theirs, 'split as tensorflow_text does') == len(texts)


def test_wordpiece_decode_and_special_ids(exports, wordpiece_held_out):
  """Decode: HF's WordPiece decoder also attaches . , ! ? to the word before."""
  vocabulary, ids, tok = exports['wordpiece-bert']
  texts, our_ids = wordpiece_held_out
  ours = [re.sub(r' ([.,!?])(?= |$)', r'\1', vocabulary.decode(i)) for i in our_ids]
  theirs = tok.batch_decode(our_ids)
  equal = _count_equal('wordpiece-bert', ours, theirs, 'decode (BERT clean-up applied)')
  assert equal == len(texts), [(a, b) for a, b in zip(ours, theirs) if a != b][:3]
  special = {t: vocabulary.tokens.index(t) for t in wordpiece.RESERVED_TOKENS}
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id) == tuple(special[t] for t in wordpiece.RESERVED_TOKENS)
  assert ids == {'pad_token_id': 0, 'unk_token_id': 1, 'cls_token_id': 2, 'sep_token_id': 3,
                 'mask_token_id': 4, 'eos_token_id': None, 'bos_token_id': None}
  body = _ours(vocabulary, ['Hello world'])[0]
  assert tok('Hello world')['input_ids'] == [2] + body + [3]
  assert tok('a', 'b')['token_type_ids'] == [0, 0, 0, 1, 1]
  assert tok.decode([2] + body + [3, 0, 0], skip_special_tokens=True) == vocabulary.decode(body)


# ----------------------------------------------------------------------------
# Errors and imports.


def test_unsupported_vocabularies_and_model_types(tmp_path):
  with pytest.raises(UserError, match='ByteVocabulary'):
    tokenizer_files.save(seqio.ByteVocabulary(), str(tmp_path), model_type='t5')
  with pytest.raises(UserError, match='gpt_neox'):
    tokenizer_files.save(vocab_lib.embedded_vocabulary(), str(tmp_path), model_type='gpt_neox')
  with pytest.raises(UserError, match='model_type bert'):
    tokenizer_files.save(wordpiece.embedded_wordpiece_vocabulary(), str(tmp_path),
                         model_type='gpt2')


def _imports(module):
  """Top-level names of every module `module` imports (any depth in its source)."""
  path = os.path.join(REPO, *module.split('.')) + '.py'
  if not os.path.exists(path):
    path = os.path.join(REPO, *module.split('.'), '__init__.py')
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      if node.module == 't5x_lite' or node.module.startswith('t5x_lite.'):
        yield from (f'{node.module}.{alias.name}' for alias in node.names)


def test_import_loads_neither_torch_nor_transformers():
  """The module, its packages and the t5x_lite modules it imports (read from
  their source, transitively) import neither torch nor transformers."""
  seen, todo, third_party = set(), ['t5x_lite.hf.tokenizer_files'], set()
  while todo:
    module = todo.pop()
    if module in seen:
      continue
    seen.add(module)
    parts = module.split('.')
    todo += ['.'.join(parts[:i]) for i in range(1, len(parts))]  # its packages' __init__
    for name in _imports(module):
      if name.split('.')[0] != 't5x_lite':
        third_party.add(name.split('.')[0])
      elif os.path.exists(os.path.join(REPO, *name.split('.')) + '.py') or os.path.isdir(
          os.path.join(REPO, *name.split('.'))):
        todo.append(name)
  assert {'t5x_lite', 't5x_lite.hf', 't5x_lite.data.wordpiece'} <= seen
  assert not third_party & {'torch', 'transformers'}, third_party
