"""data.hf_vocab / vocab.hf_vocabulary against transformers.AutoTokenizer on
tokenizers built here with the `tokenizers` library (nothing downloaded), and
import_hf handing an imported GPT-2 its tokenizer for a training run."""

import functools
import io
import json
import os
import shutil

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from conftest import REPO, main_in_process, read_metrics, require, require_shared_data
from t5x_lite import hf
from t5x_lite import import_hf
from t5x_lite import train as train_lib
from t5x_lite.data import hf_vocab
from t5x_lite.data import lm
from t5x_lite.data import sources
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
from t5x_lite.tasks import lm as lm_tasks

torch = require('torch')
transformers = require('transformers')
tokenizers = require('tokenizers')
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,wrong-import-position

# Whitespace runs, tabs, accents (composed and combining), emoji, CJK and
# other characters the training text lacks (bytes outside the vocabulary).
HAND_WRITTEN = [
    'Hello world!',
    '  two  leading spaces,\ttabs\t\tand   runs of spaces  ',
    'Café naïve résumé — “curly quotes” and cafe\u0301 combined',
    'Emoji: 😀🚀👍🏽 and a family 👨‍👩‍👧',
    '東京は日本の首都です。한국어 텍스트. Ελληνικά, русский.',
    'ß ﬁ Ω ≈ ∑ ∞ \u00a0no-break space and \u200bzero width',
    'new\nlines\n\nand a trailing tab\t',
    'Wow!! Really?! Yes!',
    '',
]
TASK = 'test_hf_vocab_wikitext_lm'
NAMES = ('gpt2_tokenizer_json', 'gpt2_vocab_merges', 'bart_tokenizer_json',
         'bart_vocab_merges', 'bert_wordpiece', 'sentencepiece_unigram',
         't5_sentencepiece')


@pytest.fixture(scope='module')
def texts():
  """A few hundred training lines (WikiText valid) and held-out lines (WikiText test)."""
  def read(name, count):
    path = require_shared_data('text', 'wikitext-2', name)
    with open(path, encoding='utf-8') as f:
      return [line.rstrip('\n') for line in f if line.strip()][:count]
  return read('valid.txt', 300), read('test.txt', 400)


def _byte_level_bpe(lines, special_tokens):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(lines, trainers.BpeTrainer(
      vocab_size=500, special_tokens=special_tokens,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _files_copy(json_dir, out, tok, added):
  """vocab.json + merges.txt as the Hub's GPT-2 / BART directories hold them
  (the added tokens inside vocab.json) with the same tokenizer_config.json.
  transformers 5's save_pretrained writes only tokenizer.json, so the BPE
  model writes the two files itself."""
  os.makedirs(out)
  tok.model.save(out)
  with open(os.path.join(out, 'vocab.json'), encoding='utf-8') as f:
    vocab = json.load(f)
  for token in added:
    vocab[token] = len(vocab)
  with open(os.path.join(out, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  shutil.copy(os.path.join(json_dir, 'tokenizer_config.json'), out)
  return out


@pytest.fixture(scope='module')
def tokenizer_dirs(texts, tmp_path_factory):
  train_lines = texts[0]
  root = tmp_path_factory.mktemp('tokenizers')
  dirs = {}
  # GPT-2: byte-level BPE, '!' (the first byte symbol) is id 0 and
  # <|endoftext|> (eos, bos and unk) comes after the merges.
  gpt2 = _byte_level_bpe(train_lines, [])
  eot = '<|endoftext|>'
  transformers.GPT2TokenizerFast(
      tokenizer_object=gpt2, eos_token=eot, bos_token=eot, unk_token=eot,
  ).save_pretrained(root / 'gpt2_tokenizer_json')
  dirs['gpt2_tokenizer_json'] = str(root / 'gpt2_tokenizer_json')
  dirs['gpt2_vocab_merges'] = _files_copy(dirs['gpt2_tokenizer_json'],
                                          str(root / 'gpt2_vocab_merges'), gpt2, [eot])
  # BART / RoBERTa: <s> <pad> </s> <unk> are ids 0-3, <mask> (lstrip) the last.
  bart = _byte_level_bpe(train_lines, ['<s>', '<pad>', '</s>', '<unk>'])
  bart_files = str(root / 'bart_bpe')
  os.makedirs(bart_files)
  bart.model.save(bart_files)
  transformers.RobertaTokenizer(
      vocab=os.path.join(bart_files, 'vocab.json'),
      merges=os.path.join(bart_files, 'merges.txt'),
  ).save_pretrained(root / 'bart_tokenizer_json')
  dirs['bart_tokenizer_json'] = str(root / 'bart_tokenizer_json')
  dirs['bart_vocab_merges'] = _files_copy(dirs['bart_tokenizer_json'],
                                          str(root / 'bart_vocab_merges'), bart, ['<mask>'])
  # BERT: WordPiece, lower-cased, [PAD]=0; Hub BERT configs ask for transformers'
  # clean-up of spaces before punctuation.
  wordpiece = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
  wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  wordpiece.decoder = decoders.WordPiece()
  wordpiece.train_from_iterator(train_lines, trainers.WordPieceTrainer(
      vocab_size=500, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']))
  bert_dir = root / 'bert_wordpiece'
  transformers.BertTokenizerFast(
      tokenizer_object=wordpiece, unk_token='[UNK]', sep_token='[SEP]', pad_token='[PAD]',
      cls_token='[CLS]', mask_token='[MASK]').save_pretrained(bert_dir)
  config = json.loads((bert_dir / 'tokenizer_config.json').read_text())
  config['clean_up_tokenization_spaces'] = True
  (bert_dir / 'tokenizer_config.json').write_text(json.dumps(config))
  dirs['bert_wordpiece'] = str(bert_dir)
  # SentencePiece-style unigram (Metaspace, NFKC), T5's <pad>=0 </s>=1 <unk>=2.
  unigram = tokenizers.SentencePieceUnigramTokenizer()
  unigram.train_from_iterator(train_lines, vocab_size=500, unk_token='<unk>',
                              special_tokens=['<pad>', '</s>', '<unk>'])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=unigram._tokenizer, eos_token='</s>', unk_token='<unk>',  # pylint: disable=protected-access
      pad_token='<pad>').save_pretrained(root / 'sentencepiece_unigram')
  dirs['sentencepiece_unigram'] = str(root / 'sentencepiece_unigram')
  # T5: a sentencepiece-trained unigram model that transformers converts (its
  # T5Tokenizer class builds the pipeline), with 10 <extra_id_N> on top.
  spm = require('sentencepiece')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(train_lines), model_writer=model, vocab_size=500,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  os.makedirs(root / 'spiece')
  (root / 'spiece' / 'spiece.model').write_bytes(model.getvalue())
  transformers.T5Tokenizer.from_pretrained(root / 'spiece', extra_ids=10).save_pretrained(
      root / 't5_sentencepiece')
  dirs['t5_sentencepiece'] = str(root / 't5_sentencepiece')
  assert set(dirs) == set(NAMES)
  return dirs


@pytest.fixture(scope='module', params=NAMES)
def pair(request, tokenizer_dirs):
  """(name, our vocabulary, AutoTokenizer) over one directory."""
  directory = tokenizer_dirs[request.param]
  return (request.param, hf_vocab.HfTokenizerVocabulary(directory),
          transformers.AutoTokenizer.from_pretrained(directory))


def test_files_as_saved(tokenizer_dirs):
  """Each directory holds the layout its name says (what the loader must read)."""
  for name, directory in tokenizer_dirs.items():
    files = set(os.listdir(directory))
    if name.endswith('vocab_merges'):
      assert {'vocab.json', 'merges.txt'} <= files and 'tokenizer.json' not in files
    else:
      assert 'tokenizer.json' in files
    assert hf_vocab.tokenizer_files(directory)


def test_ids_and_text_equal_autotokenizer(pair, texts):
  name, ours, auto = pair
  lines = texts[1] + HAND_WRITTEN
  unknown = 0
  for line in lines:
    ids = auto(line, add_special_tokens=False)['input_ids']
    assert list(ours.encode(line)) == ids, (name, line)
    assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True), (name, line)
    unknown += ours.unk_id in ids
  if name.startswith(('gpt2', 'bart')):  # byte-level: every string comes back
    for line in lines:  # (but WikiText's '<unk>' is BART's unk token)
      if auto.unk_token not in line:
        assert ours.decode(ours.encode(line)) == line
  else:  # characters outside the vocabulary become unk, as in transformers
    assert unknown >= 3
  # EOS ends the text, and the padding after it never shows.
  for line in HAND_WRITTEN[:4]:
    ids = auto(line, add_special_tokens=False)['input_ids']
    padded = ids + [ours.eos_id] + ours.encode('tail text') + [0] * 3
    assert ours.decode(padded) == auto.decode(ids, skip_special_tokens=True)


def test_special_ids_and_size(pair):
  name, ours, auto = pair
  assert ours.vocab_size == len(auto)
  expected_eos = auto.eos_token_id if auto.eos_token_id is not None else auto.sep_token_id
  assert ours.eos_id == expected_eos is not None
  assert ours.unk_id == auto.unk_token_id is not None
  assert ours.bos_id == auto.bos_token_id
  assert ours.hf_pad_id == auto.pad_token_id
  assert ours.zero_is_text == name.startswith('gpt2')
  for role in ('cls', 'sep', 'mask'):  # for BERT's objectives and BART's noise
    expected = getattr(auto, f'{role}_token_id')
    assert getattr(ours, f'{role}_id', None) == expected, role
    assert hasattr(ours, f'{role}_id') == (expected is not None)
  assert ours.special_ids == sorted(auto.all_special_ids)
  assert ours == hf_vocab.HfTokenizerVocabulary(ours.directory)
  # Special tokens in the text are matched whole, as transformers does.
  line = f'a {auto.unk_token} b {auto.mask_token or ""}  c{auto.eos_token}d'
  assert list(ours.encode(line)) == auto(line, add_special_tokens=False)['input_ids']


def test_tf_path_equals_python(pair, texts):
  name, ours, _ = pair
  lines = texts[1][:20] + HAND_WRITTEN
  expected = [list(ours.encode(line)) for line in lines]
  assert ours.encode_tf(tf.constant(lines[0])).numpy().tolist() == expected[0]
  assert ours.encode_tf(tf.constant(lines)).to_list() == expected
  # In a seqio pipeline (tf.data map, graph mode), EOS appended by seqio.
  feature = {'targets': seqio.Feature(ours)}
  ds = tf.data.Dataset.from_tensor_slices({'targets': lines})
  ds = seqio.preprocessors.tokenize(ds, feature)
  ds = seqio.preprocessors.append_eos(ds, feature)
  got = [ex['targets'].tolist() for ex in ds.as_numpy_iterator()]
  assert got == [ids + [ours.eos_id] for ids in expected]
  # Decoding a padded batch: EOS, then seqio's padding (0).
  length = max(map(len, got)) + 2
  batch = np.array([ids + [0] * (length - len(ids)) for ids in got], np.int32)
  decoded = [t.decode('utf-8') for t in ours.decode_tf(tf.constant(batch)).numpy()]
  assert decoded == [ours.decode(row) for row in batch.tolist()], name
  assert decoded == [ours.decode(ids) for ids in expected]


def test_id_zero_collision_as_documented(tokenizer_dirs):
  """GPT-2's '!' is id 0, seqio's padding id: what hf_vocab's docstring says."""
  ours = vocab_lib.hf_vocabulary(tokenizer_dirs['gpt2_tokenizer_json'])
  auto = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs['gpt2_tokenizer_json'])
  assert auto.convert_ids_to_tokens(0) == '!' and auto.pad_token_id is None
  ids = list(ours.encode('Wow! ok'))
  assert 0 in ids and ids == auto('Wow! ok', add_special_tokens=False)['input_ids']
  # The LM feature converter gives the '!' target loss weight 0, like padding.
  ds = tf.data.Dataset.from_tensors({'targets': tf.constant(ids + [ours.eos_id], tf.int32)})
  converted = next(seqio.DecoderFeatureConverter(pack=False)(
      ds, {'targets': 12}).as_numpy_iterator())
  weights = converted['decoder_loss_weights']
  targets = converted['decoder_target_tokens']
  n = len(ids) + 1
  assert weights[:n].tolist() == [int(t != 0) for t in ids + [ours.eos_id]]
  assert weights[ids.index(0)] == 0 and weights[n:].sum() == 0 and targets[n:].sum() == 0
  # Decoding cuts at EOS; without an EOS, padding comes back as '!'.
  assert ours.decode(ids + [ours.eos_id, 0, 0]) == 'Wow! ok'
  assert ours.decode(ids + [0, 0]) == 'Wow! ok!!'
  assert ours.decode_tf(tf.constant(ids + [ours.eos_id, 0, 0])).numpy() == b'Wow! ok'
  # seqio's own decode_tf would have put 0 (here '!') after EOS.
  base = seqio.Vocabulary.decode_tf(ours, tf.constant(ids + [ours.eos_id, 5, 5]))
  assert base.numpy() == b'Wow! ok!!'
  # Where id 0 is a special token (BART's <s>, BERT's [PAD]) padding disappears.
  for name in ('bart_tokenizer_json', 'bert_wordpiece'):
    other = vocab_lib.hf_vocabulary(tokenizer_dirs[name])
    assert not other.zero_is_text
    assert other.decode(list(other.encode('ok')) + [0, 0]) == other.decode(other.encode('ok'))


def _converted(converter, examples, lengths):
  """All of `converter`'s output for 'targets' examples, stacked."""
  ds = tf.data.Dataset.from_generator(
      lambda: ({'targets': np.asarray(ids, np.int32)} for ids in examples),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  rows = list(converter(ds, lengths).as_numpy_iterator())
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def test_zero_is_text_converter(tokenizer_dirs, tmp_path):
  """With GPT-2's '!' = 0, the converter import_hf binds gives the loss
  weights and attention of the real tokens, and our logits on its batch equal
  transformers' GPT-2 with the matching attention_mask."""
  ours = vocab_lib.hf_vocabulary(tokenizer_dirs['gpt2_tokenizer_json'])
  lines = ['Wow! ok', 'Hello world!! Yes!', 'no marks here', '!']
  examples = [list(ours.encode(line)) + [ours.eos_id] for line in lines]
  assert sum(ids.count(0) for ids in examples) >= 5
  converter = hf_vocab.ZeroIsTextDecoderFeatureConverter
  length = 16
  got = _converted(converter(pack=False), examples, {'targets': length})
  assert set(got) == {'decoder_target_tokens', 'decoder_input_tokens',
                      'decoder_loss_weights', 'decoder_attention_mask'}
  assert set(got) == set(converter(pack=False).get_model_feature_lengths({'targets': length}))
  for i, ids in enumerate(examples):  # by hand: the ids, then padding
    pad = [0] * (length - len(ids))
    real = [1] * len(ids) + pad
    assert got['decoder_target_tokens'][i].tolist() == ids + pad
    assert got['decoder_input_tokens'][i].tolist() == ([0] + ids + pad)[:length]  # shifted right
    assert got['decoder_loss_weights'][i].tolist() == real
    assert got['decoder_attention_mask'][i].tolist() == real
  # Packed: segment ids and positions as seqio packs the same lengths with no 0 in them.
  packed = _converted(converter(pack=True), examples, {'targets': 24})
  proxy = [[i or 7 for i in ids] for ids in examples]
  reference = _converted(seqio.DecoderFeatureConverter(pack=True), proxy, {'targets': 24})
  for k in ('decoder_segment_ids', 'decoder_positions', 'decoder_loss_weights'):
    np.testing.assert_array_equal(packed[k], reference[k], err_msg=k)
  np.testing.assert_array_equal(packed['decoder_attention_mask'],
                                packed['decoder_segment_ids'] > 0)
  real = packed['decoder_segment_ids'] > 0
  assert packed['decoder_target_tokens'][real].tolist() == sum(examples, [])

  # The model: a tiny GPT-2 through hf.load, against transformers.
  config = transformers.GPT2Config(vocab_size=ours.vocab_size, n_positions=32, n_embd=32,
                                   n_layer=2, n_head=4)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  hf_model = transformers.GPT2LMHeadModel(config).eval()
  hf_model.save_pretrained(tmp_path)
  model, params = hf.load(str(tmp_path))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(got['decoder_input_tokens']).long(),
                      attention_mask=torch.from_numpy(got['decoder_attention_mask']).long()
                      ).logits.numpy()
  valid = got['decoder_attention_mask'] > 0
  logits = jax.jit(model.logits)  # one compile for both batches
  ours_logits = np.asarray(logits(params, got))
  np.testing.assert_allclose(ours_logits[valid], theirs[valid], atol=1e-4)
  # seqio's own converter masks the positions whose target is '!': other logits.
  plain = _converted(seqio.DecoderFeatureConverter(pack=False), examples, {'targets': length})
  assert (plain['decoder_loss_weights'] < got['decoder_loss_weights']).sum() >= 5
  plain = {k: plain[k] for k in got if k != 'decoder_attention_mask'}
  plain['decoder_attention_mask'] = plain['decoder_target_tokens'] > 0  # the model's default
  assert np.abs(np.asarray(logits(params, plain))[valid] - theirs[valid]).max() > 1e-3


def test_older_directory_layout(tokenizer_dirs, tmp_path):
  """GPT-2's files with the special tokens in special_tokens_map.json and
  extra tokens in added_tokens.json (what older transformers saved)."""
  directory = tmp_path / 'legacy'
  shutil.copytree(tokenizer_dirs['gpt2_vocab_merges'], directory)
  eot = '<|endoftext|>'
  (directory / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'GPT2Tokenizer'}))
  (directory / 'special_tokens_map.json').write_text(
      json.dumps({'eos_token': eot, 'bos_token': eot, 'unk_token': {'content': eot}}))
  (directory / 'added_tokens.json').write_text(json.dumps({'<|bot|>': 502, '<|user|>': 501}))
  ours = hf_vocab.HfTokenizerVocabulary(directory)
  auto = transformers.AutoTokenizer.from_pretrained(directory)
  assert ours.vocab_size == len(auto) == 503
  assert (ours.eos_id, ours.unk_id) == (auto.eos_token_id, auto.unk_token_id) == (500, 500)
  line = f'hi <|user|> there<|bot|>! ok{eot}x'
  ids = auto(line, add_special_tokens=False)['input_ids']
  assert list(ours.encode(line)) == ids and {500, 501, 502} <= set(ids)
  before_eos = ids[:ids.index(500)]
  assert ours.decode(ids) == auto.decode(before_eos, skip_special_tokens=True)


def test_saved_truncation_and_padding_ignored(tokenizer_dirs, tmp_path):
  """A tokenizer.json saved with truncation and padding on (as some are):
  neither applies, as in transformers without truncation= / padding=."""
  tok = tokenizers.Tokenizer.from_file(
      os.path.join(tokenizer_dirs['sentencepiece_unigram'], 'tokenizer.json'))
  tok.enable_truncation(max_length=4)
  tok.enable_padding(length=64, pad_id=0, pad_token='<pad>')
  shutil.copytree(tokenizer_dirs['sentencepiece_unigram'], tmp_path / 'tok')
  tok.save(str(tmp_path / 'tok' / 'tokenizer.json'))
  ours = hf_vocab.HfTokenizerVocabulary(tmp_path / 'tok')
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / 'tok')
  line = HAND_WRITTEN[2]
  ids = auto(line, add_special_tokens=False)['input_ids']
  assert 4 < len(ids) < 64 and list(ours.encode(line)) == ids


def test_hf_vocabulary_cached_and_errors(tokenizer_dirs, tmp_path):
  directory = tokenizer_dirs['sentencepiece_unigram']
  same = os.path.join(directory, '..', os.path.basename(directory))
  assert vocab_lib.hf_vocabulary(directory) is vocab_lib.hf_vocabulary(same)
  with pytest.raises(UserError, match='tokenizer directory not found'):
    vocab_lib.hf_vocabulary(tmp_path / 'missing')
  (tmp_path / 'vocab.json').write_text('{}')  # merges.txt missing
  with pytest.raises(UserError) as e:
    vocab_lib.hf_vocabulary(tmp_path)
  message = str(e.value)
  assert 'tokenizer.json, or vocab.json + merges.txt' in message and '\n' not in message
  (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(UserError, match='cannot read'):
    hf_vocab.HfTokenizerVocabulary(tmp_path)


def test_import_hf_gpt2_trains_with_its_tokenizer(tokenizer_dirs, texts, tmp_path, capsys):
  """import_hf on a GPT-2 directory with its tokenizer; the model.gin it
  writes is all the model and vocabulary configuration a run needs."""
  source = tokenizer_dirs['gpt2_tokenizer_json']
  auto = transformers.AutoTokenizer.from_pretrained(source)
  config = transformers.GPT2Config(vocab_size=len(auto), n_positions=64, n_embd=32,
                                   n_layer=1, n_head=4, bos_token_id=auto.bos_token_id,
                                   eos_token_id=auto.eos_token_id)
  torch.manual_seed(0)
  hf_dir, out = tmp_path / 'hf', tmp_path / 'imported'
  transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
  auto.save_pretrained(hf_dir)
  import_hf.main(['--hf_dir', str(hf_dir), '--output_dir', str(out)])
  summary = capsys.readouterr().out
  assert f"tokenizer {out / 'tokenizer'} ({len(auto):,} ids)" in summary
  for name in os.listdir(out / 'tokenizer'):
    assert (out / 'tokenizer' / name).read_bytes() == (hf_dir / name).read_bytes()
  assert set(os.listdir(out / 'tokenizer')) == {'tokenizer.json', 'tokenizer_config.json'}

  # The gin binds VOCABULARY to the copied tokenizer.
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_file(str(out / 'model.gin'))
    imported = gin.query_parameter('%VOCABULARY').scoped_configurable_fn()
    model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)
  assert imported == hf_vocab.HfTokenizerVocabulary(hf_dir)
  assert imported.directory == str(out / 'tokenizer')
  assert issubclass(model.FEATURE_CONVERTER_CLS, hf_vocab.ZeroIsTextDecoderFeatureConverter)
  line = HAND_WRITTEN[3]
  assert list(imported.encode(line)) == auto(line, add_special_tokens=False)['input_ids']

  # Training on a seqio task (embedded_lm's preprocessors over WikiText lines,
  # which build faster than the embedded corpus): the tokenizer's 501 ids fit
  # the model, the task's own 8100-id vocabulary would not, so the vocabulary
  # reached the data; the run needs nothing of the model but model.gin.
  lines = texts[1]
  if TASK not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        TASK, source=sources.FunctionSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                {'text': lines}), splits=('train',)),
        preprocessors=[functools.partial(seqio.preprocessors.rekey,
                                         key_map={'inputs': None, 'targets': 'text'}),
                       seqio.preprocessors.tokenize, lm.causal_lm],
        output_features=lm_tasks.causal_lm_output_features(), metric_fns=[])
  assert seqio.get_mixture_or_task(TASK).output_features['targets'].vocabulary.vocab_size == 8100
  run_gin = tmp_path / 'run.gin'
  run_gin.write_text(f"""
include 'configs/runs/pretrain.gin'
include '{out / 'model.gin'}'
INITIAL_CHECKPOINT_PATH = '{out / 'checkpoint'}'
MIXTURE_OR_TASK_NAME = '{TASK}'
TASK_FEATURE_LENGTHS = {{'targets': 32}}
BATCH_SIZE = 4
TRAIN_STEPS = 2
""")
  model_dir = tmp_path / 'run'
  argv = [f'--gin_file={run_gin}', f"--gin.MODEL_DIR='{model_dir}'",
          '--gin.train_script.train.log_every=1', '--gin.train_script.train.progress_bar=False']
  with pytest.raises(UserError, match='8100 ids'):  # without the binding
    main_in_process(train_lib, argv + ['--gin.VOCABULARY=None'])
  main_in_process(train_lib, argv)
  printed = capsys.readouterr().out
  assert f"initialised params from {out / 'checkpoint'}" in printed
  rows = read_metrics(model_dir)
  assert [row['step'] for row in rows] == [1, 2]
  # A random 501-way model starts near ln(501) = 6.2 nats per token.
  assert abs(rows[0]['loss'] - np.log(len(auto))) < 1.0, rows[0]
  operative = (model_dir / 'config.gin').read_text()
  assert 'hf_vocabulary' in operative and str(out / 'tokenizer') in operative


def test_import_hf_bart_gin_speaks_seqio(tokenizer_dirs, tmp_path):
  """An imported BART's model.gin: its tokenizer as the vocabulary, and
  seqio's padding and decoder start (0) in place of Hugging Face's 1 and 2."""
  auto = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs['bart_vocab_merges'])
  config = transformers.BartConfig(
      vocab_size=len(auto), d_model=16, encoder_layers=1, decoder_layers=1,
      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
      decoder_ffn_dim=32, max_position_embeddings=32)
  assert (config.pad_token_id, config.decoder_start_token_id) == (1, 2)
  hf_dir, out = tmp_path / 'hf', tmp_path / 'imported'
  transformers.BartForConditionalGeneration(config).save_pretrained(hf_dir)
  for name in os.listdir(tokenizer_dirs['bart_vocab_merges']):  # the files, not tokenizer.json
    shutil.copy(os.path.join(tokenizer_dirs['bart_vocab_merges'], name), hf_dir)
  import_hf.import_hf(str(hf_dir), str(out))
  assert set(os.listdir(out / 'tokenizer')) == {'vocab.json', 'merges.txt',
                                                'tokenizer_config.json'}
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config_file(str(out / 'model.gin'))
    model = gin.query_parameter('%MODEL').scoped_configurable_fn()
    imported = gin.query_parameter('%VOCABULARY').scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)
  assert (model.config.pad_id, model.config.decoder_start_id) == (0, 0)
  assert model.config.vocab_size == imported.vocab_size == len(auto)
  assert (imported.eos_id, imported.mask_id) == (auto.eos_token_id, auto.mask_token_id)
  line = 'A <mask> in the middle, and  spaces.'
  assert list(imported.encode(line)) == auto(line, add_special_tokens=False)['input_ids']


def test_readme_binding(tokenizer_dirs):
  """The README's VOCABULARY lines, with a real directory, give the vocabulary."""
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  snippet = text.split('`model.gin` ends with', 1)[1].split('```', 2)[1]
  directory = tokenizer_dirs['bert_wordpiece']
  snippet = snippet.replace('/abs/path/OUT/tokenizer', directory)
  gin.clear_config(clear_constants=True)
  try:
    gin.parse_config('from __gin__ import dynamic_registration\n' + snippet)
    vocabulary = gin.query_parameter('%VOCABULARY').scoped_configurable_fn()
  finally:
    gin.clear_config(clear_constants=True)
  assert vocabulary is vocab_lib.hf_vocabulary(directory)
