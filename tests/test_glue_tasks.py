"""GLUE / SuperGLUE sources and tasks on the real files in shared/data.

References: Python's csv / json on the same files, TFDS's own builders (run on
copies of the files), and T5's formats written out by hand.
"""

import csv
import json
import logging
import os
from unittest import mock

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from conftest import SHARED_DATA, require, require_shared_data
from t5x_lite import gin_utils
from t5x_lite.tasks import glue  # registers the tasks and mixtures
from t5x_lite.data import glue_sources
from t5x_lite.data import registry
from t5x_lite.data import settings
from t5x_lite.errors import UserError

GLUE = os.path.join(SHARED_DATA, 'glue')
SUPER_GLUE = os.path.join(SHARED_DATA, 'super_glue')
LOCAL = glue_sources.data_settings(source='files', glue_dir=GLUE,
                                   super_glue_dir=SUPER_GLUE)
# One thread running fused maps: chained maps hand each example between
# threads, which is slow on a busy machine.
FUSED = tf.data.Options()
FUSED.experimental_optimization.map_fusion = True
FUSED.autotune.enabled = False
FUSED.threading.private_threadpool_size = 1
MNLI_COLUMNS = ['index', 'promptID', 'pairID', 'genre', 'sentence1_binary_parse',
                'sentence2_binary_parse', 'sentence1_parse', 'sentence2_parse',
                'sentence1', 'sentence2']


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def _tsv(*rows):
  return ''.join('\t'.join(map(str, r)) + '\n' for r in rows)


def _jsonl(*rows):
  return ''.join(json.dumps(r) + '\n' for r in rows)


RECORD_ROW = {
    'source': 'test', 'idx': 3,
    'passage': {'text': 'Alice met Bob in Paris.\n@highlight\nBob was happy',
                'entities': [{'start': 0, 'end': 4}, {'start': 10, 'end': 12},
                             {'start': 17, 'end': 21}, {'start': 0, 'end': 4}]},
    'qas': [{'query': '@placeholder met Bob.', 'idx': 7,
             'answers': [{'start': 0, 'end': 4, 'text': 'Alice'}]},
            {'query': 'They met in @placeholder.', 'idx': 8,
             'answers': [{'start': 17, 'end': 21, 'text': 'Paris'},
                         {'start': 0, 'end': 21, 'text': 'Alice met Bob in Paris'},
                         {'start': 17, 'end': 21, 'text': 'Paris'}]}]}


@pytest.fixture(scope='module')
def shared_glue():
  """The shared GLUE and SuperGLUE files must exist (see conftest.require_shared_data)."""
  require_shared_data('glue')
  require_shared_data('super_glue')


@pytest.fixture(scope='module')
def data_dirs(shared_glue, tmp_path_factory):
  """The shared files, plus small hand-written files in the original formats
  for the benchmarks without a sample (MRPC, QQP, MNLI, AX, CB, ReCoRD)."""
  del shared_glue
  root = tmp_path_factory.mktemp('glue_data')
  glue_dir, sg_dir = str(root / 'glue'), str(root / 'super_glue')
  for src, dst in ((GLUE, glue_dir), (SUPER_GLUE, sg_dir)):
    os.makedirs(dst)
    for name in os.listdir(src):
      os.symlink(os.path.join(src, name), os.path.join(dst, name))
  _write(f'{glue_dir}/MRPC/dev.tsv', '\ufeff' + _tsv(
      ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'],
      [1, 1089874, 1089925, 'PCCW \'s chief said " yes " .', 'He said yes .']))
  _write(f'{glue_dir}/QQP/dev.tsv', _tsv(
      ['id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'],
      [0, 1, 2, 'How do I learn?', 'How can I learn?', 1]))
  _write(f'{glue_dir}/MNLI/dev_matched.tsv', _tsv(
      MNLI_COLUMNS + ['label1', 'label2', 'gold_label'],
      [0, 1, '1n', 'fiction', '( x )', '( y )', '(ROOT x)', '(ROOT y)',
       'The cat slept.', 'An animal slept.', 'entailment', 'neutral',
       'neutral']))
  _write(f'{glue_dir}/MNLI/dev_mismatched.tsv', _tsv(
      MNLI_COLUMNS + ['label1', 'gold_label'],
      [0, 2, '2c', 'letters', '( x )', '( y )', '(ROOT x)', '(ROOT y)',
       'It is sunny.', 'It is raining.', 'contradiction', 'contradiction']))
  _write(f'{glue_dir}/MNLI/test_matched.tsv', _tsv(
      MNLI_COLUMNS, [0, 3, '3', 'fiction', '( x )', '( y )', '(ROOT x)',
                     '(ROOT y)', 'A.', 'B.']))
  _write(f'{glue_dir}/diagnostic/diagnostic.tsv', _tsv(
      ['index', 'sentence1', 'sentence2'],
      [0, 'The cat sat on the mat.', 'The cat did not sit on the mat.']))
  _write(f'{sg_dir}/CB/val.jsonl', _jsonl(
      {'premise': 'It was raining.', 'hypothesis': 'It rained.',
       'label': 'neutral', 'idx': 0}))
  _write(f'{sg_dir}/ReCoRD/val.jsonl', _jsonl(RECORD_ROW))
  return glue_dir, sg_dir


@pytest.fixture
def files(data_dirs):
  """The run's GLUE settings: the local files."""
  glue_dir, sg_dir = data_dirs
  settings.use(glue=glue_sources.data_settings(source='files', glue_dir=glue_dir,
                                               super_glue_dir=sg_dir))
  yield data_dirs
  settings.use()


def test_gin_bound_settings_are_passed_in_once(data_dirs, tmp_path):
  """parse_gin hands the bound settings to the data layer; building a dataset
  reads no gin (clearing the config afterwards changes nothing)."""
  glue_dir, sg_dir = data_dirs
  config = tmp_path / 'files.gin'
  config.write_text(f"""
from __gin__ import dynamic_registration
from t5x_lite.data import glue_sources
glue_sources.data_settings:
  source = 'files'
  glue_dir = '{glue_dir}'
  super_glue_dir = '{sg_dir}'
  on_bad_row = 'skip'
""")
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(config)], [])
    gin.clear_config()
    assert settings.glue() == glue_sources.DataSettings('files', glue_dir, sg_dir, None, 'skip')
    with open(f'{GLUE}/SST-2/dev.tsv', encoding='utf-8') as f:
      first = next(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
    task = seqio.get_mixture_or_task('glue_sst2_v002')
    ex = _first(task.get_dataset(None, split='validation', shuffle=False))
    assert ex['inputs_pretokenized'].decode() == 'sst2 sentence: ' + first['sentence']
    gin_utils.parse_gin([str(config)], ["glue_sources.data_settings.source = 'tfds'"])
    assert settings.glue().source == 'tfds'
    gin.clear_config()
    (tmp_path / 'none.gin').write_text('# binds nothing\n')
    gin_utils.parse_gin([str(tmp_path / 'none.gin')], [])
    assert settings.glue() == glue_sources.DataSettings()  # a run that binds none: defaults
  finally:
    gin.clear_config()
    settings.use()


def _first(ds):
  return next(ds.with_options(FUSED).as_numpy_iterator())


def _unbatch(ds):
  """The examples of `ds`, read as one batch (much faster than one by one)."""
  columns = _first(ds.batch(1 << 20))

  def row(cols, i):
    return {k: row(v, i) if isinstance(v, dict) else v[i]
            for k, v in cols.items()}

  return [row(columns, i) for i in range(len(tf.nest.flatten(columns)[0]))]


def _rows(source, split, shuffle=False, **kwargs):
  return _unbatch(source.get_dataset(split, shuffle=shuffle, **kwargs))


def _text_rows(benchmark, config, split, settings):
  """(source row, text example) pairs, without tokenizing."""
  source = glue_sources.make_source(benchmark, config, settings=settings)
  ds = source.get_dataset(split, shuffle=False)
  texts = ds
  for step in glue.text_preprocessors(benchmark, config):
    texts = step(texts)
  return list(zip(_unbatch(ds), _unbatch(texts)))


def _csv_rows(path):
  with open(path, encoding='utf-8-sig', newline='') as f:
    return list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))


def _json_rows(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.usefixtures('shared_glue')
def test_glue_files_rows_match_csv_reading():
  sst2 = glue_sources.make_source('glue', 'sst2', settings=LOCAL)
  assert sst2.num_input_examples('validation') == 872
  assert sst2.num_input_examples('train') == 67349  # counted, not tokenized
  dev = _csv_rows(f'{GLUE}/SST-2/dev.tsv')[1:]
  rows = _rows(sst2, 'validation')
  assert [r['sentence'].decode() for r in rows] == [r[0] for r in dev]
  assert [r['label'] for r in rows] == [int(r[1]) for r in dev]
  assert [r['idx'] for r in rows] == list(range(872))

  cola = _rows(glue_sources.make_source('glue', 'cola', settings=LOCAL),
               'validation')
  raw = _csv_rows(f'{GLUE}/CoLA/dev.tsv')  # no header: the first row is data
  assert len(cola) == len(raw) == 1043
  assert [(r['sentence'].decode(), int(r['label'])) for r in cola] == [
      (r[3], int(r[1])) for r in raw]

  stsb = _rows(glue_sources.make_source('glue', 'stsb', settings=LOCAL),
               'validation')
  scores = [np.float32(r[9]) for r in _csv_rows(f'{GLUE}/STS-B/dev.tsv')[1:]]
  assert stsb[0]['label'].dtype == np.float32 and len(stsb) == 1500
  np.testing.assert_array_equal([r['label'] for r in stsb], scores)

  rte = _rows(glue_sources.make_source('glue', 'rte', settings=LOCAL), 'train')
  names = ('entailment', 'not_entailment')  # TFDS glue/rte's class order
  assert [names[r['label']] for r in rte] == [
      r[3] for r in _csv_rows(f'{GLUE}/RTE/train.tsv')[1:]]


@pytest.mark.usefixtures('shared_glue')
def test_super_glue_files_rows_match_json_reading():
  def source(config, split='validation'):
    return _rows(glue_sources.make_source('super_glue', config, settings=LOCAL),
                 split)

  boolq = _json_rows(f'{SUPER_GLUE}/BoolQ/val.jsonl')
  rows = source('boolq')
  assert len(rows) == 3270
  assert [r['label'] for r in rows] == [int(b['label'] == 'true') for b in boolq]
  assert [r['question'].decode() for r in rows] == [b['question'] for b in boolq]

  copa = source('copa')
  assert [r['label'] for r in copa] == [
      c['label'] for c in _json_rows(f'{SUPER_GLUE}/COPA/val.jsonl')]

  multirc = _json_rows(f'{SUPER_GLUE}/MultiRC/val.jsonl')
  answers = [(p['idx'], q['idx'], a['idx'], a['label'], a['text'])
             for p in multirc for q in p['passage']['questions']
             for a in q['answers']]
  rows = source('multirc')
  assert len(rows) == len(answers) == 4848  # one row per answer option
  assert [(r['idx']['paragraph'], r['idx']['question'], r['idx']['answer'],
           r['label'], r['answer'].decode()) for r in rows] == answers

  wic = source('wic')
  assert len(wic) == 638 and wic[0]['start1'] == 25 and wic[0]['end2'] == 90
  wsc = source('wsc')
  raw = _json_rows(f'{SUPER_GLUE}/WSC/val.jsonl')
  assert [(r['span2_index'], r['label']) for r in wsc] == [
      (w['target']['span2_index'], int(w['label'] == 'true')) for w in raw]

  axb = source('axb', 'test')
  assert len(axb) == 1104
  assert [r['label'] for r in axb] == [
      ('entailment', 'not_entailment').index(a['label'])
      for a in _json_rows(f'{SUPER_GLUE}/AX-b/AX-b.jsonl')]
  assert len(source('axg', 'test')) == 356


def _prepare_tfds(raw_dir, data_dir, names):
  """Runs TFDS's own builders on local copies (its download step mocked)."""
  tfds = require('tensorflow_datasets')
  with mock.patch.object(tfds.download.DownloadManager,
                         'download_and_extract', lambda self, url: raw_dir):
    for name in names:
      tfds.builder(name, data_dir=data_dir).download_and_prepare()


def _normalized(rows):
  def canonical(value):
    if isinstance(value, dict):
      return tuple((k, canonical(v)) for k, v in sorted(value.items()))
    return repr(value)
  return sorted(canonical(r) for r in rows)


@pytest.mark.usefixtures('shared_glue')
def test_files_give_what_tfds_builders_give(tmp_path):
  raw = tmp_path / 'raw'
  cola = open(f'{GLUE}/CoLA/dev.tsv').readlines()
  _write(f'{raw}/CoLA/train.tsv', ''.join(cola[:30]))
  _write(f'{raw}/CoLA/dev.tsv', ''.join(cola[30:80]))
  _write(f'{raw}/CoLA/test.tsv', _tsv(['index', 'sentence'], *[
      [i, line.rstrip('\n').split('\t')[3]] for i, line in enumerate(cola[:5])]))
  stsb = _csv_rows(f'{GLUE}/STS-B/dev.tsv')
  _write(f'{raw}/STS-B/train.tsv', _tsv(*stsb[:40]))
  _write(f'{raw}/STS-B/dev.tsv', _tsv(stsb[0], *stsb[40:90]))
  _write(f'{raw}/STS-B/test.tsv', _tsv(*[r[:-1] for r in stsb[:6]]))
  multirc = open(f'{SUPER_GLUE}/MultiRC/val.jsonl').readlines()
  _write(f'{raw}/MultiRC/train.jsonl', ''.join(multirc[:2]))
  _write(f'{raw}/MultiRC/val.jsonl', ''.join(multirc[2:6]))
  unlabelled = [json.loads(line) for line in multirc[6:8]]
  for p in unlabelled:
    for q in p['passage']['questions']:
      for a in q['answers']:
        del a['label']
  _write(f'{raw}/MultiRC/test.jsonl', _jsonl(*unlabelled))
  # SuperGLUE's own WSC files hold JSON booleans; TFDS's builder needs them.
  wsc = [{**w, 'label': w['label'] == 'true'}
         for w in _json_rows(f'{SUPER_GLUE}/WSC/val.jsonl')]
  _write(f'{raw}/WSC/train.jsonl', _jsonl(*wsc[:20]))
  _write(f'{raw}/WSC/val.jsonl', _jsonl(*wsc[20:]))
  _write(f'{raw}/WSC/test.jsonl', _jsonl(*[
      {k: v for k, v in w.items() if k != 'label'} for w in wsc[:10]]))
  configs = [('glue', 'cola'), ('glue', 'stsb'), ('super_glue', 'multirc'),
             ('super_glue', 'wsc.fixed')]
  _prepare_tfds(str(raw), str(tmp_path / 'tfds'),
                [f'{b}/{c}' for b, c in configs])

  from_tfds = glue_sources.data_settings(tfds_data_dir=str(tmp_path / 'tfds'))
  from_files = glue_sources.data_settings(
      source='files', glue_dir=str(raw), super_glue_dir=str(raw))
  for benchmark, config in configs:
    a = glue_sources.make_source(benchmark, config, settings=from_tfds)
    b = glue_sources.make_source(benchmark, config, settings=from_files)
    for split in ('train', 'validation', 'test'):
      ds_a, ds_b = (s.get_dataset(split, shuffle=False) for s in (a, b))
      assert ds_a.element_spec == ds_b.element_spec, (config, split)
      rows_a, rows_b = _unbatch(ds_a), _unbatch(ds_b)
      assert a.num_input_examples(split) == len(rows_a) == len(rows_b) > 0
      assert _normalized(rows_a) == _normalized(rows_b), (config, split)
    assert {r['label'] for r in rows_b} == {-1}  # the test split


def test_every_task_formats_as_t5(files):
  del files
  boolq = _json_rows(f'{SUPER_GLUE}/BoolQ/val.jsonl')[0]
  multirc = _json_rows(f'{SUPER_GLUE}/MultiRC/val.jsonl')[0]['passage']
  expected = {
      'glue_cola_v002': (
          'cola sentence: The sailors rode the breeze clear of the rocks.',
          'acceptable'),
      'glue_sst2_v002': (
          "sst2 sentence: it 's a charming and often affecting journey . ",
          'positive'),
      'glue_mrpc_v002': (
          'mrpc sentence1: PCCW \'s chief said " yes " . sentence2: He said '
          'yes .', 'equivalent'),
      'glue_qqp_v002': (
          'qqp question1: How do I learn? question2: How can I learn?',
          'duplicate'),
      'glue_stsb_v002': (
          'stsb sentence1: A man with a hard hat is dancing. sentence2: A man '
          'wearing a hard hat is dancing.', '5.0'),
      'glue_mnli_v002': (
          'mnli hypothesis: An animal slept. premise: The cat slept.',
          'neutral'),
      'glue_mnli_mismatched_v002': (
          'mnli hypothesis: It is raining. premise: It is sunny.',
          'contradiction'),
      'glue_qnli_v002': (
          'qnli question: What came into force after the new constitution was '
          'herald? sentence: As of that day, the new constitution heralding the'
          ' Second Republic came into force.', 'entailment'),
      'glue_rte_v002': (
          'rte sentence1: Dana Reeve, the widow of the actor Christopher Reeve,'
          ' has died of lung cancer at age 44, according to the Christopher '
          'Reeve Foundation. sentence2: Christopher Reeve had an accident.',
          'not_entailment'),
      'glue_wnli_v002': (
          'wnli sentence1: The drain is clogged with hair. It has to be '
          'cleaned. sentence2: The hair has to be cleaned.', 'not_entailment'),
      'super_glue_boolq_v102': (
          f"boolq passage: {boolq['passage']} question: {boolq['question']}",
          'False'),
      'super_glue_cb_v102': (
          'cb hypothesis: It rained. premise: It was raining.', 'neutral'),
      'super_glue_copa_v102': (
          'copa choice1: The toilet filled with water. choice2: Water flowed '
          'from the spout. premise: The man turned on the faucet. question: '
          'effect', 'choice2'),
      'super_glue_multirc_v102': (
          'multirc question: Would the mass of a baseball affect how much force'
          ' you have to use to pick it up? answer: No paragraph: '
          + multirc['text'], 'False'),
      'super_glue_record_v102': (
          'record query: @placeholder met Bob. entities: Alice, Bob, Paris '
          'passage: Alice met Bob in Paris. Bob was happy', 'Alice'),
      'super_glue_rte_v102': (
          'rte hypothesis: Christopher Reeve had an accident. premise: Dana '
          'Reeve, the widow of the actor Christopher Reeve, has died of lung '
          'cancer at age 44, according to the Christopher Reeve Foundation.',
          'not_entailment'),
      'super_glue_wic_v102': (
          'wic sentence1: An emerging professional class. sentence2: '
          'Apologizing for losing your temper, even though you were badly '
          'provoked, showed real class. word: class', 'False'),
      'super_glue_wsc_v102': (
          'wsc text: Bernard , who had not told the government official that '
          'he was less than 21 when he filed for a homestead claim, did not '
          'consider that he had done anything dishonest. Still, * anyone * who'
          ' knew that he was 19 years old could take his claim away from # him'
          ' # .', 'False'),
  }
  test_split = {
      'glue_ax_v002': (
          'mnli hypothesis: The cat did not sit on the mat. premise: The cat '
          'sat on the mat.', '<unk>'),
      'super_glue_axb_v102': (
          'rte hypothesis: The cat did not sit on the mat. premise: The cat sat'
          ' on the mat.', 'not_entailment'),
      'super_glue_axg_v102': (
          'rte hypothesis: The accountant sought help filing taxes. premise: '
          'The taxpayer met with the accountant to get help filing his taxes.',
          'not_entailment'),
  }
  for name, split in [(n, 'validation') for n in expected] + [
      (n, 'test') for n in test_split]:
    task = seqio.get_mixture_or_task(name)
    ds = task.source.get_dataset(split, shuffle=False).take(1)
    for step in task.preprocessors[:-2]:  # all but tokenize, append EOS
      ds = step(ds)
    ex = _first(ds)
    assert (ex['inputs'].decode(), ex['targets'].decode()) == {
        **expected, **test_split}[name], name
  for name in ('glue_sst2_v002', 'super_glue_record_v102'):  # the whole task
    task = seqio.get_mixture_or_task(name)
    ex = _first(task.get_dataset(None, split='validation', shuffle=False))
    vocab = task.output_features['targets'].vocabulary
    for key in ('inputs', 'targets'):
      text = expected[name][key == 'targets']
      assert ex[key].tolist() == vocab.encode(text) + [vocab.eos_id], name


@pytest.mark.usefixtures('shared_glue')
def test_formats_hold_on_every_row():
  """STS-B targets round to 0.2; every target maps back to its label."""
  for source, text in _text_rows('glue', 'stsb', 'validation', LOCAL):
    score = np.round(np.float32(source['label']) * 5) / 5
    assert text['targets'].decode() == '%.1f' % score
  for benchmark, config, name in [('glue', 'cola', 'glue_cola_v002'),
                                  ('super_glue', 'wic', 'super_glue_wic_v102'),
                                  ('super_glue', 'axb', 'super_glue_axb_v102')]:
    split = 'test' if config == 'axb' else 'validation'
    post = seqio.get_mixture_or_task(name).postprocess_fn
    pairs = _text_rows(benchmark, config, split, LOCAL)
    assert [post(t['targets'], example=t, is_target=True) for _, t in pairs] == [
        s['label'] for s, _ in pairs]


def test_postprocessors_and_label_words():
  for name in ('glue_cola_v002', 'glue_mnli_v002', 'super_glue_cb_v102',
               'super_glue_copa_v102', 'super_glue_wsc_v102'):
    words = registry.label_words(seqio.get_mixture_or_task(name))
    post = seqio.get_mixture_or_task(name).postprocess_fn
    assert [post(w) for w in words] == list(range(len(words)))
    assert [post(w.encode()) for w in words] == list(range(len(words)))
    assert post('maybe') == -1 and post('') == -1
  assert glue.label_words('super_glue_cb_v102') == [
      'entailment', 'contradiction', 'neutral']
  assert registry.label_words('glue_rte_v002') == ['entailment', 'not_entailment']
  assert registry.label_words('glue_stsb_v002') is None
  assert registry.label_words('super_glue_record_v102') is None
  assert registry.label_words('no_such_task') is None

  stsb = seqio.get_mixture_or_task('glue_stsb_v002').postprocess_fn
  assert stsb('3.8') == pytest.approx(3.8) and stsb(b'0.4') == pytest.approx(0.4)
  assert stsb('high') == -1 and stsb('nan') == -1
  multirc = seqio.get_mixture_or_task('super_glue_multirc_v102').postprocess_fn
  example = {'idx/question': np.int32(12)}
  assert multirc(b'True', example=example, is_target=True) == {
      'group': 12, 'value': 1}
  assert multirc('yes', example=example) == {'group': 12, 'value': -1}
  record = seqio.get_mixture_or_task('super_glue_record_v102').postprocess_fn
  example = {'answers': np.array([b'Paris', b'Paris, France'])}
  assert record(b'Paris', example=example, is_target=True) == [
      'Paris', 'Paris, France']
  assert record('Lyon', example=example) == 'Lyon'
  axg = seqio.get_mixture_or_task('super_glue_axg_v102').postprocess_fn
  assert axg('entailment', example={'idx': np.int32(7)}) == {
      'group': 3, 'value': 0}


def test_record_and_mnli_splits(files):
  del files
  record = seqio.get_mixture_or_task('super_glue_record_v102')
  examples = list(record.get_dataset(None, split='validation', shuffle=False)
                  .as_numpy_iterator())
  assert len(examples) == 2  # one per query
  assert [e['targets_pretokenized'] for e in examples] == [
      b'Alice', b'Alice met Bob in Paris']
  post = record.postprocess_fn
  assert post(None, example=examples[1], is_target=True) == [
      'Alice met Bob in Paris', 'Paris']
  mnli = seqio.get_mixture_or_task('glue_mnli_v002')
  test = next(mnli.get_dataset(None, split='test', shuffle=False)
              .as_numpy_iterator())
  assert test['targets_pretokenized'] == b'<unk>'
  assert mnli.postprocess_fn(b'<unk>', example=test, is_target=True) == -1
  assert mnli.source.num_input_examples('validation_mismatched') == 1
  mismatched = seqio.get_mixture_or_task('glue_mnli_mismatched_v002').source
  assert mismatched.split_map == {'validation': 'validation_mismatched',
                                  'test': 'test_mismatched'}


@pytest.mark.usefixtures('shared_glue')
def test_shards_and_shuffle():
  source = glue_sources.make_source('glue', 'sst2', settings=LOCAL)
  whole = [r['idx'] for r in _rows(source, 'validation')]
  shards = [[r['idx'] for r in _rows(
      source, 'validation', shard_info=seqio.ShardInfo(i, 3))] for i in range(3)]
  assert [whole[i::3] for i in range(3)] == shards
  shuffled = [[r['idx'] for r in _rows(source, 'validation', shuffle=True,
                                        seed=s)] for s in (1, 1, 2)]
  assert shuffled[0] == shuffled[1] != shuffled[2]
  assert sorted(shuffled[0]) == whole != shuffled[0]


def test_malformed_rows_raise_or_are_skipped(tmp_path, caplog):
  path = tmp_path / 'SST-2' / 'dev.tsv'
  _write(str(path), _tsv(['sentence', 'label'], ['good .', 1],
                         ['a row', 'with', 'three fields'], ['fine .', 0],
                         ['bad label .', 'maybe']))
  settings = dict(source='files', glue_dir=str(tmp_path))
  source = glue_sources.make_source(
      'glue', 'sst2', settings=glue_sources.data_settings(**settings))
  with pytest.raises(UserError, match=f'{path}:3: 3 tab-separated fields'):
    source.get_dataset('validation')
  skipping = glue_sources.make_source('glue', 'sst2', settings=(
      glue_sources.data_settings(on_bad_row='skip', **settings)))
  with caplog.at_level(logging.WARNING):
    rows = _rows(skipping, 'validation')
  assert [r['sentence'] for r in rows] == [b'good .', b'fine .']
  assert [r['idx'] for r in rows] == [0, 2]
  skipped = [r for r in caplog.records if 'Skipped' in r.getMessage()]
  assert len(skipped) == 1 and 'Skipped 2 malformed' in skipped[0].getMessage()

  boolq = tmp_path / 'BoolQ' / 'val.jsonl'
  _write(str(boolq), _jsonl({'question': 'q', 'passage': 'p', 'idx': 0,
                             'label': True}) + '{"question": oops\n')
  with pytest.raises(UserError, match=f'{boolq}:2: malformed JSON'):
    glue_sources.make_source('super_glue', 'boolq', settings=(
        glue_sources.data_settings(source='files', super_glue_dir=str(
            tmp_path)))).num_input_examples('validation')


def test_missing_data_names_the_path(tmp_path, files):
  glue_dir, _ = files
  with pytest.raises(UserError, match=f'{tmp_path}/nowhere/SST-2'):
    glue_sources.make_source('glue', 'sst2', settings=glue_sources.data_settings(
        source='files', glue_dir=str(tmp_path / 'nowhere'))).get_dataset('train')
  cola = seqio.get_mixture_or_task('glue_cola_v002')
  cola.source.check_available('validation')
  with pytest.raises(UserError, match='CoLA/train.tsv'):
    cola.source.check_available()
  with pytest.raises(UserError, match=(
      rf"No 'train' split of glue_cola_v002 \(glue/cola\): looked for "
      rf'{glue_dir}/CoLA/train.tsv; .* has dev.tsv')):
    cola.get_dataset(None, split='train')
  with pytest.raises(UserError, match='No glue_dir set'):
    glue_sources.make_source('glue', 'sst2', settings=(
        glue_sources.data_settings(source='files'))).get_dataset('validation')
  with pytest.raises(UserError, match="source='ftp' is unknown"):
    glue_sources.data_settings(source='ftp')


def test_missing_tfds_dataset_says_how_to_switch(tmp_path):
  source = glue_sources.make_source('glue', 'sst2', name='glue_sst2_v002',
                                    settings=glue_sources.data_settings(
                                        tfds_data_dir=str(tmp_path)))
  with pytest.raises(UserError, match=(
      rf'TFDS dataset glue_sst2_v002 \(glue/sst2\) not found in data dir '
      rf"{tmp_path} .*source = 'files'")):
    source.get_dataset('train')


def test_mixture_rates_count_training_rows(files):
  glue_dir, _ = files
  mixture = seqio.get_mixture_or_task('glue_v002_proportional')
  assert {t.name for t in mixture.tasks} == set(glue.GLUE_MIXTURE_TASKS)
  tasks_by_name = {t.name: t for t in mixture.tasks}
  assert mixture.get_rate(tasks_by_name['glue_sst2_v002']) == 67349
  assert mixture.get_rate(tasks_by_name['glue_rte_v002']) == 2490
  assert mixture.get_rate(tasks_by_name['glue_mnli_mismatched_v002']) == 0
  assert glue.rate_num_examples(tasks_by_name['glue_sst2_v002'],
                                maximum=1000) == 1000
  with pytest.raises(UserError, match=f'glue_cola_v002.*{glue_dir}/CoLA/train'):
    mixture.get_rate(tasks_by_name['glue_cola_v002'])
  super_glue = seqio.get_mixture_or_task('super_glue_v102_proportional')
  assert not {'super_glue_axb_v102', 'super_glue_axg_v102'} & {
      t.name for t in super_glue.tasks}


def test_labelled_glue_diagnostic_is_preferred(tmp_path):
  _write(f'{tmp_path}/diagnostic/diagnostic.tsv', _tsv(
      ['index', 'sentence1', 'sentence2'], [0, 'A dog ran.', 'A cat ran.']))
  _write(f'{tmp_path}/diagnostic/diagnostic-full.tsv', _tsv(
      ['Lexical Semantics', 'Predicate-Argument Structure', 'Logic',
       'Knowledge', 'Domain', 'Premise', 'Hypothesis', 'Label'],
      ['Negation', '', '', '', 'Artificial', 'A dog ran.', 'A cat ran.',
       'contradiction']))
  rows = _rows(glue_sources.make_source('glue', 'ax', settings=(
      glue_sources.data_settings(source='files', glue_dir=str(tmp_path)))),
               'test')
  assert [(r['premise'], r['hypothesis'], r['label']) for r in rows] == [
      (b'A dog ran.', b'A cat ran.', 2)]  # TFDS: entailment, neutral, contradiction
