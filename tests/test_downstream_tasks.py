"""SQuAD, CNN/DailyMail and WMT tasks on the shared samples and small files.

References: T5's formats written out by hand, Python's json / re on the same
files (RE2's [[:punct:]] is ASCII punctuation and its \\s is [\\t\\n\\f\\r ]),
and TFDS's own SQuAD builder run on a copy of the file.
"""

import json
import logging
import os
import re
import string
from unittest import mock

import gin
import jax.numpy as jnp
import pytest
import seqio
import tensorflow as tf

from conftest import SHARED_DATA, main_in_process, require, require_shared_data
from t5x_lite import evaluation
from t5x_lite import gin_utils
from t5x_lite import metrics
from t5x_lite import train as train_lib
from t5x_lite.data import downstream_sources
from t5x_lite.data import glue_sources
from t5x_lite.data import registry
from t5x_lite.data import settings
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner
from t5x_lite.tasks import downstream  # registers the tasks
from t5x_lite.tasks import glue

SQUAD = os.path.join(SHARED_DATA, 'squad', 'dev-v2.0_two_articles.json')
WMT16 = os.path.join(SHARED_DATA, 'translation', 'wmt16_en_ro_sample.jsonl')
C4 = os.path.join(SHARED_DATA, 'text', 'c4', 'c4_en_train_first1000.jsonl')
SQUAD_TASKS = ('squad_v010_allanswers', 'squad_v010_context_free')


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def _jsonl(*rows):
  return ''.join(json.dumps(r) + '\n' for r in rows)


def _text(value):
  return value.decode('utf-8') if isinstance(value, bytes) else value


def _examples(task_name, split, **files):
  """The task's text examples (pretokenized fields) from files."""
  settings.use(glue=glue_sources.data_settings(source='files', **files))
  try:
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(None, split=split, shuffle=False)
    return [{k: v for k, v in ex.items() if k not in ('inputs', 'targets')}
            for ex in ds.as_numpy_iterator()]
  finally:
    settings.use()


def _squad_json():
  with open(SQUAD, encoding='utf-8') as f:
    return json.load(f)


def _pad(text):
  """T5's punctuation padding, in Python's re with RE2's classes."""
  text = re.sub('([' + re.escape(string.punctuation) + '])', r' \1 ', text)
  return re.sub(r'[\t\n\f\r ]+', ' ', text)


@pytest.fixture(scope='module')
def shared_squad():
  require_shared_data('squad/dev-v2.0_two_articles.json')


def test_squad_formats_as_t5(shared_squad, caplog):
  del shared_squad
  with caplog.at_level(logging.INFO):
    rows = _examples('squad_v010_allanswers', 'validation',
                     squad_files={'validation': SQUAD})
  assert len(rows) == 276  # of 532 questions
  assert re.search(r'Skipped 256 unanswerable .* read the 276 answerable',
                   caplog.text)
  by_id = {_text(r['id']): r for r in rows}
  quake = by_id['5705ffde52bb891400689785']
  assert _text(quake['inputs_pretokenized']) == (
      'question: What magnitude of earthquake can many faults produce ? '
      'context: Many faults are able to produce a magnitude 6 . 7 + earthquake '
      ', such as the San Andreas Fault , which can produce a magnitude 8 . 0 '
      'event . Other faults include the San Jacinto Fault , the Puente Hills '
      'Fault , and the Elsinore Fault Zone . The USGS has released a '
      'California Earthquake forecast which models Earthquake occurrence in '
      'California . ')
  assert _text(quake['targets_pretokenized']) == '6 . 7'
  assert [_text(a) for a in quake['answers']] == ['6 . 7', '6 . 7 + ',
                                                   '6 . 7 + ']
  monks = by_id['56de52614396321400ee27fc']
  assert _text(monks['question']) == (
      'What monastery did the Saint - Evroul monks establish in Italy ? ')
  assert [_text(a) for a in monks['answers']] == [
      "Latin monastery at Sant ' Eufemia . ", "a Latin monastery at Sant ' "
      'Eufemia', "Sant ' Eufemia"]

  # Every answerable question, against the file read with json and re.
  expected = {}
  for article in _squad_json()['data']:
    for paragraph in article['paragraphs']:
      for qa in paragraph['qas']:
        if not qa['is_impossible']:
          expected[qa['id']] = (qa['question'], paragraph['context'],
                                [a['text'] for a in qa['answers']])
  assert set(by_id) == set(expected)
  for qid, (question, context, answers) in expected.items():
    row = by_id[qid]
    assert _text(row['inputs_pretokenized']) == re.sub(
        '[\t\n\f\r ]+', ' ',
        f'question: {_pad(question)} context: {_pad(context)}')
    assert [_text(a) for a in row['answers']] == [_pad(a) for a in answers]
    assert _text(row['targets_pretokenized']) == _pad(answers[0])

  free = _examples('squad_v010_context_free', 'validation',
                   squad_files={'validation': SQUAD})
  assert [_text(r['inputs_pretokenized']) for r in free[:1]] == [
      'squad trivia question: In what country is Normandy located ? ']
  assert len(free) == 276


def test_squad_postprocess_and_metric(shared_squad):
  del shared_squad
  rows = _examples('squad_v010_allanswers', 'validation',
                   squad_files={'validation': SQUAD})[:3]
  task = seqio.get_mixture_or_task('squad_v010_allanswers')
  targets = [task.postprocess_fn(r['targets_pretokenized'], example=r,
                                 is_target=True) for r in rows]
  assert targets[1] == ['10th and 11th centuries',
                        'in the 10th and 11th centuries',
                        '10th and 11th centuries', '10th and 11th centuries']
  predictions = [task.postprocess_fn(p) for p in (
      b'France', b'in the 10th and 11th centuries', b'Norway')]
  assert predictions[0] == 'France'
  # Two exact answers of three, the third shares no token with its answers.
  result = task.metric_fns[0](targets, predictions)
  assert result['em'] == pytest.approx(200 / 3)
  assert result == metrics.squad(targets, predictions)


def test_translation_formats_as_t5(tmp_path):
  require_shared_data('translation/wmt16_en_ro_sample.jsonl')
  rows = _examples('wmt16_enro_v003', 'train',
                   translation_files={'wmt16_enro_v003': {'train': WMT16}})
  assert len(rows) == 10
  assert _text(rows[1]['inputs_pretokenized']) == (
      'translate English to Romanian: Approval of Minutes of previous '
      'sitting: see Minutes')
  assert _text(rows[1]['targets_pretokenized']) == (
      'Aprobarea procesului-verbal al şedinţei precedente: a se vedea '
      'procesul-verbal')
  with open(WMT16, encoding='utf-8') as f:
    pairs = [json.loads(line)['translation'] for line in f]
  assert [(_text(r['inputs_pretokenized']), _text(r['targets_pretokenized']))
          for r in rows] == [('translate English to Romanian: ' + p['en'],
                              p['ro']) for p in pairs]

  # The same rows as two line-aligned plain-text files.
  en = _write(tmp_path / 'train.en', ''.join(p['en'] + '\n' for p in pairs))
  ro = _write(tmp_path / 'train.ro', ''.join(p['ro'] + '\n' for p in pairs))
  aligned = _examples('wmt16_enro_v003', 'train', translation_files={
      'wmt16_enro_v003': {'train': {'en': en, 'ro': ro}}})
  assert aligned == rows

  # Each pair's prefix, from English.
  for task, lang, prefix in (
      ('wmt14_ende_v003', 'de', 'translate English to German: '),
      ('wmt14_enfr_v003', 'fr', 'translate English to French: '),
      ('wmt15_enfr_v003', 'fr', 'translate English to French: '),
      ('wmt19_ende_v003', 'de', 'translate English to German: '),
      ('wmt_t2t_ende_v003', 'de', 'translate English to German: ')):
    path = _write(tmp_path / f'{task}.jsonl', _jsonl(
        {'translation': {lang: 'Guten Tag.', 'en': 'Good day.'}}))
    (row,) = _examples(task, 'validation',
                       translation_files={task: {'validation': path}})
    assert _text(row['inputs_pretokenized']) == prefix + 'Good day.'
    assert _text(row['targets_pretokenized']) == 'Guten Tag.'


def test_summarize_formats_as_t5(tmp_path):
  """Articles from the C4 sample, with a made-up highlight: the first sentence."""
  require_shared_data('text/c4/c4_en_train_first1000.jsonl')
  with open(C4, encoding='utf-8') as f:
    articles = [json.loads(next(f))['text'] for _ in range(3)]
  highlights = [a.split('\n')[0] for a in articles]
  path = _write(tmp_path / 'validation.jsonl', _jsonl(*[
      {'article': a, 'highlights': h, 'id': str(i)}
      for i, (a, h) in enumerate(zip(articles, highlights))]))
  rows = _examples('cnn_dailymail_v002', 'validation',
                   cnn_dailymail_files={'validation': path})
  assert _text(rows[0]['targets_pretokenized']) == (
      'Beginners BBQ Class Taking Place in Missoula!')
  assert _text(rows[0]['inputs_pretokenized']).startswith(
      'summarize: Beginners BBQ Class Taking Place in Missoula!\nDo you want '
      'to get better at making delicious BBQ?')
  assert [(_text(r['inputs_pretokenized']), _text(r['targets_pretokenized']))
          for r in rows] == [('summarize: ' + a, h)
                             for a, h in zip(articles, highlights)]
  task = seqio.get_mixture_or_task('cnn_dailymail_v002')
  assert task.metric_fns == [metrics.rouge]


def test_missing_tfds_dataset_names_the_directory(tmp_path):
  settings.use(glue=glue_sources.data_settings(tfds_data_dir=str(tmp_path)))
  try:
    for name, tfds_name in (('squad_v010_allanswers', 'squad/v1.1'),
                            ('cnn_dailymail_v002', 'cnn_dailymail'),
                            ('wmt16_enro_v003', 'wmt16_translate/ro-en')):
      with pytest.raises(UserError, match=(
          rf'^TFDS dataset {name} \({tfds_name}\) not found in data dir '
          rf'{tmp_path} ')) as e:
        registry.check_data_available(name, 'validation')
      assert '\n' not in str(e.value)
  finally:
    settings.use()


def test_file_errors_name_the_files(tmp_path, caplog):
  en = _write(tmp_path / 'dev.en', 'One.\nTwo.\nThree.\n')
  ro = _write(tmp_path / 'dev.ro', 'Unu.\nDoi.\n')
  files = {'wmt16_enro_v003': {'validation': {'en': en, 'ro': ro}}}
  with pytest.raises(UserError, match=(
      rf'^Line-aligned files of wmt16_enro_v003 .* differ in length: {en} '
      rf'\(3 lines\) and {ro} \(2 lines\)')):
    _examples('wmt16_enro_v003', 'validation', translation_files=files)

  ro = _write(tmp_path / 'dev.ro', 'Unu.\n\nTrei.\n')  # a blank line
  with pytest.raises(UserError, match=rf'^Malformed row at {ro}:2: blank line'):
    _examples('wmt16_enro_v003', 'validation', translation_files=files)

  bad = _write(tmp_path / 'train.jsonl', _jsonl(
      {'translation': {'en': 'A.', 'ro': 'A.'}}) + '{"translation": {"en": "B."}}\n'
      + '\n' + 'not json\n')
  files = {'wmt16_enro_v003': {'train': bad}}
  with pytest.raises(UserError, match=(
      rf"^Malformed row at {bad}:2: field 'translation.ro' is missing")):
    _examples('wmt16_enro_v003', 'train', translation_files=files)
  with caplog.at_level(logging.WARNING):
    rows = _examples('wmt16_enro_v003', 'train', translation_files=files,
                     on_bad_row='skip')
  assert len(rows) == 1 and 'Skipped 2 malformed row(s)' in caplog.text

  cnn = _write(tmp_path / 'cnn.jsonl', _jsonl({'article': 'A.', 'highlights': 'A.'},
                                              {'article': 'B.'}))
  with pytest.raises(UserError, match=rf"^Malformed row at {cnn}:2: field 'highlights'"):
    _examples('cnn_dailymail_v002', 'validation',
              cnn_dailymail_files={'validation': cnn})

  squad = _write(tmp_path / 'squad.json', '{"data": [\n{"paragraphs": [}\n]}')
  with pytest.raises(UserError, match=rf'^Malformed JSON at {squad}:2: '):
    _examples('squad_v010_allanswers', 'validation',
              squad_files={'validation': squad})
  squad = _write(tmp_path / 'squad.json', json.dumps({'data': [{'paragraphs': [
      {'context': 'Paris is in France.', 'qas': [
          {'id': 'q1', 'question': 'Where is Paris?',
           'answers': [{'text': 'France', 'answer_start': 12}]},
          {'id': 'q2', 'question': 'What is Paris?', 'answers': []}]}]}]}))
  with pytest.raises(UserError, match=(
      rf'^Malformed row at {squad} at data\[0\].paragraphs\[0\].qas\[1\] \(id '
      r'q2\): no answers')):
    _examples('squad_v010_allanswers', 'validation',
              squad_files={'validation': squad})

  with pytest.raises(UserError, match=(
      r"^No squad_files set for squad_v010_allanswers .*squad_files = ")):
    _examples('squad_v010_allanswers', 'validation')
  with pytest.raises(UserError, match=(
      rf"^No 'train' file of squad_v010_allanswers .* \(it has validation\)")):
    _examples('squad_v010_allanswers', 'train', squad_files={'validation': squad})
  with pytest.raises(UserError, match=rf'^{tmp_path}/nowhere.json not found'):
    _examples('squad_v010_allanswers', 'validation',
              squad_files={'validation': str(tmp_path / 'nowhere.json')})


def test_gin_binds_the_files(tmp_path):
  config = tmp_path / 'files.gin'
  config.write_text(f"""
from __gin__ import dynamic_registration
from t5x_lite.data import glue_sources
glue_sources.data_settings:
  source = 'files'
  squad_files = {{'validation': '{tmp_path}/dev.json'}}
  translation_files = {{'wmt16_enro_v003': {{'validation': {{'en': 'a.en', 'ro': 'a.ro'}}}}}}
""")
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(config)], [])
    assert settings.glue().squad_files == {'validation': f'{tmp_path}/dev.json'}
    assert settings.glue().translation_files == {
        'wmt16_enro_v003': {'validation': {'en': 'a.en', 'ro': 'a.ro'}}}
  finally:
    gin.clear_config()
    settings.use()


def test_tfds_source_reads_what_the_squad_builder_prepares(shared_squad,
                                                           tmp_path):
  """TFDS's squad/v1.1 builder on a v1.1-style copy of the shared file gives
  the rows the files source reads from it."""
  del shared_squad
  tfds = require('tensorflow_datasets')
  doc = _squad_json()
  for article in doc['data']:
    for paragraph in article['paragraphs']:
      paragraph['qas'] = [
          {k: v for k, v in qa.items() if k not in ('is_impossible',
                                                      'plausible_answers')}
          for qa in paragraph['qas'] if not qa['is_impossible']]
  path = _write(tmp_path / 'dev-v1.1.json', json.dumps(doc))
  data_dir = str(tmp_path / 'tfds')
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         lambda self, urls: {k: path for k in urls}):
    tfds.builder('squad/v1.1', data_dir=data_dir).download_and_prepare()
  from_tfds = downstream_sources.squad_source(
      settings=glue_sources.data_settings(tfds_data_dir=data_dir))
  from_files = downstream_sources.squad_source(
      settings=glue_sources.data_settings(source='files',
                                          squad_files={'validation': path}))
  ds_a = from_tfds.get_dataset('validation', shuffle=False)
  ds_b = from_files.get_dataset('validation', shuffle=False)
  assert ds_a.element_spec == ds_b.element_spec
  canon = lambda rows: sorted(json.dumps(tf.nest.map_structure(
      lambda v: v.tolist() if hasattr(v, 'tolist') else _text(v), r),
      sort_keys=True, default=_text) for r in rows)
  rows_a = list(ds_a.as_numpy_iterator())
  rows_b = list(ds_b.as_numpy_iterator())
  assert from_tfds.num_input_examples('validation') == len(rows_a) == 276
  assert canon(rows_a) == canon(rows_b)


class _ConstantModel:
  """An encoder-decoder stand-in that generates one fixed text for every row."""
  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter
  DECODER_ONLY = False
  GENERATES = True

  def __init__(self, text):
    self.ids = glue.output_features()['targets'].vocabulary.encode(text) + [1]

  def predict_batch(self, params, batch, rng=None, *, max_decode_length, **kwargs):
    del params, rng, kwargs
    rows = batch['encoder_input_tokens'].shape[0]
    out = jnp.zeros((rows, max_decode_length), jnp.int32)
    return out.at[:, :len(self.ids)].set(jnp.asarray(self.ids)), jnp.zeros(rows)

  def score(self, params, batch):
    del params
    return jnp.zeros(batch['decoder_target_tokens'].shape[0])


def test_evaluation_scores_squad_against_every_answer(shared_squad):
  """The metric sees every answer (T5's qa postprocessor), not the first: the
  second question's second answer, generated for the first 8 answerable
  questions, is an exact match once (the file read with json)."""
  del shared_squad
  answers = [[a['text'] for a in qa['answers']]
             for p in _squad_json()['data'][0]['paragraphs'] for qa in p['qas']
             if not qa['is_impossible']][:8]
  guess = 'in the 10th and 11th centuries'
  assert [guess in a for a in answers] == [False, True] + [False] * 6
  assert answers[1][0] == '10th and 11th centuries'  # not EM with the first
  settings.use(glue=glue_sources.data_settings(
      source='files', squad_files={'validation': SQUAD}))
  try:
    result = evaluation.Evaluator(
        _ConstantModel(guess), Partitioner(), {'inputs': 512, 'targets': 16},
        batch_size=4, num_examples=8).evaluate(
            None, seqio.get_mixture_or_task('squad_v010_allanswers'))
  finally:
    settings.use()
  assert result.metrics['em'] == pytest.approx(100 / 8)
  assert result.metrics == pytest.approx(metrics.squad(
      [[_pad(t) for t in a] for a in answers], [guess] * 8))
  assert [r['prediction'] for r in result.rows] == [guess] * 8


def test_supervised_mixture_rates(tmp_path):
  require_shared_data('glue', 'RTE', 'train.tsv')
  require_shared_data('translation/wmt16_en_ro_sample.jsonl')
  mixture = seqio.get_mixture_or_task('all_supervised_proportional')
  assert {t.name for t in mixture.tasks} == set(
      downstream.SUPERVISED_MIXTURE_TASKS)
  assert {'cnn_dailymail_v002', 'squad_v010_allanswers', 'wmt_t2t_ende_v003',
          'wmt15_enfr_v003', 'wmt16_enro_v003', 'glue_sst2_v002',
          'super_glue_rte_v102'} <= set(downstream.SUPERVISED_MIXTURE_TASKS)
  tasks = {t.name: t for t in mixture.tasks}
  settings.use(glue=glue_sources.data_settings(
      source='files', glue_dir=os.path.join(SHARED_DATA, 'glue'),
      squad_files={'train': SQUAD},
      translation_files={'wmt16_enro_v003': {'train': WMT16}}))
  try:
    assert mixture.get_rate(tasks['wmt16_enro_v003']) == 10
    assert mixture.get_rate(tasks['squad_v010_allanswers']) == 276
    assert mixture.get_rate(tasks['glue_rte_v002']) == 2490 / 2  # as T5's _dedupe
    assert downstream.supervised_rate(tasks['squad_v010_allanswers'],
                                      maximum=100) == 100
  finally:
    settings.use()


TINY_T5 = [f'--gin.encoder_decoder.T5Config.{k}={v}' for k, v in (
    ('emb_dim', 32), ('num_heads', 2), ('head_dim', 16), ('mlp_dim', 64),
    ('num_encoder_layers', 1), ('num_decoder_layers', 1))]


def _c4_summaries(tmp_path) -> list[str]:
  """Summarisation from C4 articles, each highlighted by its first line, as
  the gin flags of a run over them (no CNN/DailyMail sample is shared)."""
  with open(require_shared_data('text', 'c4', 'c4_en_train_first1000.jsonl'),
            encoding='utf-8') as f:
    articles = [json.loads(next(f))['text'] for _ in range(8)]
  path = _write(tmp_path / 'c4_summaries.jsonl', _jsonl(*[
      {'article': a, 'highlights': a.split('\n')[0]} for a in articles]))
  return ["--gin.MIXTURE_OR_TASK_NAME='cnn_dailymail_v002'",
          f"--gin.glue_sources.data_settings.cnn_dailymail_files="
          f"{{'train': '{path}', 'validation': '{path}'}}"]


@pytest.mark.parametrize('gin_file, task, metric', [
    ('gin/t5_tiny_squad_finetune.gin', 'squad_v010_allanswers', 'f1'),
    ('gin/t5_tiny_wmt_finetune.gin', 'wmt16_enro_v003', 'bleu'),
    ('gin/t5_tiny_wmt_finetune.gin', 'cnn_dailymail_v002', 'rougeLsum')])
def test_tiny_gins_fine_tune_and_evaluate(tmp_path, gin_file, task, metric):
  """The tiny gins' runs on the shared samples (a smaller model, 2 steps):
  the task's metrics in metrics.jsonl and MODEL_DIR/eval/<step>/. The beam
  search run doubles as summarisation on C4 articles."""
  require_shared_data('squad/dev-v2.0_two_articles.json')
  require_shared_data('translation/wmt16_en_ro_sample.jsonl')
  extra = _c4_summaries(tmp_path) if task == 'cnn_dailymail_v002' else []
  model_dir = str(tmp_path / 'run')
  main_in_process(train_lib, [
      f'--gin_file={gin_file}', *TINY_T5, *extra, f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.TRAIN_STEPS=2', '--gin.EVAL_PERIOD=2', '--gin.CHECKPOINT_PERIOD=2',
      '--gin.EVAL_NUM_EXAMPLES=4', '--gin.BATCH_SIZE=2',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
      '--gin.train_script.train.progress_bar=False'])
  with open(os.path.join(model_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    evals = [json.loads(line) for line in f if 'eval/' in line]
  others = {'f1': ['em'], 'rougeLsum': ['rouge1', 'rouge2']}.get(metric, [])
  assert [sorted(e) for e in evals] == [sorted(
      ['step', f'eval/{task}/{metric}'] + [f'eval/{task}/{m}' for m in others])]
  with open(os.path.join(model_dir, 'eval', '2', 'metrics.json'),
            encoding='utf-8') as f:
    assert json.load(f)['tasks'][task][metric] == evals[0][f'eval/{task}/{metric}']
  with open(os.path.join(model_dir, 'eval', '2', f'{task}.jsonl'),
            encoding='utf-8') as f:
    assert len(f.readlines()) == 4
