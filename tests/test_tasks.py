"""Registered tasks: embedded corpus, C4 (missing data), user file recipe; the
registry as `t5x_lite.tasks`, the data check and task metadata of the data layer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from t5x_lite import gin_utils
from t5x_lite import tasks
from t5x_lite.data import registry
from t5x_lite.data import sources
from t5x_lite.errors import UserError

from conftest import require_shared_data

LENGTHS = {'inputs': 512, 'targets': 114}
C4_JSONL = ('text', 'c4', 'c4_en_train_first1000.jsonl')
SHAKESPEARE = ('text', 'tinyshakespeare', 'input.txt')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def take(task, n, split='train', seed=None, lengths=LENGTHS):
  ds = task.get_dataset(lengths, split=split, shuffle=False, seed=seed)
  return list(ds.take(n).as_numpy_iterator())


def check_examples(examples, vocab_size=8100):
  assert examples
  for ex in examples:
    assert set(ex) == {'inputs', 'targets'}
    assert ex['inputs'].dtype == np.int32 and ex['targets'].dtype == np.int32
    assert 0 < len(ex['inputs']) <= 512 and 0 < len(ex['targets']) <= 114
    assert ex['inputs'][-1] == 1 and ex['targets'][-1] == 1
    assert ex['targets'][0] == vocab_size - 1
    assert ex['inputs'].max() < vocab_size


def test_embedded_task_features_and_determinism():
  task = seqio.get_mixture_or_task('embedded_span_corruption')
  assert task.output_features['targets'].vocabulary.vocab_size == 8100
  examples = take(task, 8, seed=0)
  check_examples(examples)
  assert all(len(e['inputs']) == 512 and len(e['targets']) == 114
             for e in examples)
  again = take(task, 8, seed=0)
  other = take(task, 8, seed=1)
  assert all((a['inputs'] == b['inputs']).all()
             for a, b in zip(examples, again))
  assert any(len(a['inputs']) != len(b['inputs']) or
             (a['inputs'] != b['inputs']).any()
             for a, b in zip(examples, other))
  check_examples(take(task, 2, split='validation', seed=0))
  registry.check_data_available('embedded_span_corruption')  # a no-op


def test_enc_dec_feature_converter_packs():
  task = seqio.get_mixture_or_task('embedded_span_corruption')
  ds = task.get_dataset(LENGTHS, split='train', shuffle=False, seed=0)
  converter = seqio.EncDecFeatureConverter(pack=True)
  batch = next(converter(ds, LENGTHS).as_numpy_iterator())
  for key in ('encoder_input_tokens', 'encoder_segment_ids',
              'encoder_positions', 'decoder_target_tokens',
              'decoder_input_tokens', 'decoder_loss_weights',
              'decoder_segment_ids', 'decoder_positions'):
    assert key in batch
  assert batch['encoder_input_tokens'].shape == (512,)
  assert batch['decoder_target_tokens'].shape == (114,)
  assert batch['decoder_input_tokens'][0] == 0  # shifted right, BOS = pad


def test_c4_missing_data_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  with pytest.raises(UserError) as e:
    registry.check_data_available('c4_v220_span_corruption')
  message = str(e.value)
  assert '\n' not in message
  for part in (str(tmp_path), 'c4/en', 'TFDS_DATA_DIR', 't5_tiny_span.gin'):
    assert part in message
  task = seqio.get_mixture_or_task('c4_v220_span_corruption')
  with pytest.raises(UserError, match='not found in data dir'):
    task.get_dataset(LENGTHS, split='train')
  assert not os.listdir(tmp_path)  # nothing downloaded or written


def test_check_data_available_unknown_name():
  with pytest.raises(UserError, match='no_such_task') as e:
    registry.check_data_available('no_such_task')
  assert '\n' not in str(e.value) and 'import t5x_lite.tasks' in str(e.value)


def test_check_data_available_asks_each_source_of_a_mixture():
  """A source with `check_available` is asked for the split; one without is not."""
  asked = []

  class Checked(sources.FunctionSource):

    def check_available(self, split=None):
      asked.append(split)
      if split == 'test':
        raise UserError('no test rows')

  seqio.TaskRegistry.remove('test_checked_source')
  seqio.TaskRegistry.add(
      'test_checked_source', metric_fns=[],
      source=Checked(dataset_fn=lambda split, shuffle_files, seed=None: None,
                     splits=('train', 'test')),
      output_features=seqio.get_mixture_or_task('embedded_span_corruption').output_features)
  seqio.MixtureRegistry.remove('test_checked_mixture')
  seqio.MixtureRegistry.add('test_checked_mixture',
                            [('test_checked_source', 1), ('embedded_span_corruption', 1)])
  registry.check_data_available('test_checked_mixture', 'train')
  assert asked == ['train']
  with pytest.raises(UserError, match='no test rows'):
    registry.check_data_available('test_checked_source', 'test')
  assert asked == ['train', 'test']


def test_label_words_travel_with_the_registration():
  task = seqio.get_mixture_or_task('glue_sst2_v002')
  assert registry.label_words(task) == ['negative', 'positive']
  # A task rebuilt from it (e.g. with another vocabulary) keeps its name and words.
  assert registry.label_words(task.replace(shuffle_buffer_size=7)) == ['negative', 'positive']
  assert registry.label_words(seqio.get_mixture_or_task('embedded_span_corruption')) is None
  kwargs = dict(source=task.source, output_features=task.output_features,
                preprocessors=task.preprocessors, metric_fns=[])
  registry.add_task('test_words', label_words=('no', 'yes'), **kwargs)
  assert registry.metadata('test_words') == registry.TaskMetadata(label_words=('no', 'yes'))
  registry.add_task('test_words', **kwargs)  # re-registered without words: none left
  assert registry.label_words('test_words') is None
  seqio.TaskRegistry.remove('test_words')


def test_registry_installs_as_t5x_lite_tasks(tmp_path):
  """From another directory the installed package has `t5x_lite.tasks` (this
  repo's tasks/) and no top-level `tasks`."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  code = ('import importlib.util as u\n'
          "print(u.find_spec('t5x_lite.tasks').origin)\n"
          "print(u.find_spec('tasks'))\n")
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, check=True,
                       capture_output=True, text=True).stdout.split('\n')
  with open(out[0], 'rb') as installed, open(os.path.join(REPO, 'tasks', '__init__.py'),
                                               'rb') as ours:
    assert installed.read() == ours.read()
  assert out[1] == 'None'


@pytest.mark.parametrize('repo_on_path', [True, False])
def test_old_import_in_gin_is_one_line(tmp_path, monkeypatch, repo_on_path):
  """`import tasks` in a gin file: from the repo's root (tasks/ importable as a
  top-level package) or elsewhere (no such module), one line says what to write."""
  path = [p for p in sys.path if os.path.abspath(p or '.') != REPO]
  monkeypatch.setattr(sys, 'path', [REPO] + path if repo_on_path else path)
  monkeypatch.chdir(REPO if repo_on_path else tmp_path)
  config = tmp_path / 'old.gin'
  config.write_text('from __gin__ import dynamic_registration\nimport tasks\nX = 1\n')
  with pytest.raises(UserError) as e:
    gin_utils.parse_gin([str(config)], [])
  message = str(e.value)
  assert '\n' not in message and 'tasks' not in sys.modules
  assert 'write `import t5x_lite.tasks` instead of `import tasks`' in message
  assert f'{config}", line 2' in message


def test_user_recipe_text_file():
  shakespeare = require_shared_data(*SHAKESPEARE)
  task = tasks.register_span_corruption_task(
      'test_shakespeare_span', shakespeare, file_format='text',
      validation_paths=shakespeare)
  examples = take(task, 4, seed=0)
  check_examples(examples)
  assert len(examples[0]['inputs']) == 512
  vocab = task.output_features['inputs'].vocabulary
  assert 'Citizen' in vocab.decode(examples[0]['inputs'].tolist())
  check_examples(take(task, 1, split='validation', seed=0))


def test_user_recipe_jsonl_file():
  c4_jsonl = require_shared_data(*C4_JSONL)
  task = tasks.register_span_corruption_task(
      'test_c4_jsonl_span', [c4_jsonl], file_format='jsonl', text_key='text')
  check_examples(take(task, 4, seed=0))
  with pytest.raises(UserError, match="'body'"):
    tasks.register_span_corruption_task(
        'test_c4_jsonl_bad_key', c4_jsonl, file_format='jsonl',
        text_key='body').get_dataset(LENGTHS, split='train')


def test_user_recipe_errors(tmp_path):
  missing = str(tmp_path / 'missing.txt')
  with pytest.raises(UserError) as e:
    tasks.register_span_corruption_task('test_missing', missing)
  assert missing in str(e.value)
  with pytest.raises(UserError, match='file_format'):
    tasks.register_span_corruption_task('test_fmt', missing, file_format='csv')

  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'text': 'fine ' * 20}) + '\n\n{"text": oops\n')
  task = tasks.register_span_corruption_task(
      'test_bad_jsonl', str(bad), file_format='jsonl')
  with pytest.raises(UserError) as e:
    task.get_dataset(LENGTHS, split='train')
  assert str(bad) in str(e.value) and 'line 3' in str(e.value)


def _prepare_fake_wikipedia(data_dir):
  """A prepared TFDS `wikipedia/20230601.en` of 12 small documents."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.dataset_builders import adhoc_builder  # pylint: disable=g-import-not-at-top
  docs = [{'title': f'Article {i}',
           'text': '\n\n'.join(f'Paragraph {j} of article {i} is about topic {i * j}.'
                               for j in range(4))} for i in range(12)]
  spec = {'title': tf.TensorSpec([], tf.string), 'text': tf.TensorSpec([], tf.string)}
  ds = tf.data.Dataset.from_generator(lambda: iter(docs), output_signature=spec)
  features = tfds.features.FeaturesDict({'title': tfds.features.Text(),
                                         'text': tfds.features.Text()})
  name, _, version = tasks.bert.WIKIPEDIA_TFDS_NAME.partition(':')
  name, config = name.split('/')
  adhoc_builder.store_as_tfds_dataset(name=name, version=version, config=config,
                                      data_dir=str(data_dir), features=features,
                                      split_datasets={'train': ds})


def test_wikipedia_bert_task_and_books_wiki_mixture(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'none'))
  with pytest.raises(UserError, match='wikipedia/20230601.en:1.0.0 not found') as e:
    registry.check_data_available('wikipedia_bert_pretraining')
  assert '\n' not in str(e.value)

  _prepare_fake_wikipedia(tmp_path / 'tfds')
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  registry.check_data_available('wikipedia_bert_pretraining')
  task = seqio.get_mixture_or_task('wikipedia_bert_pretraining')
  examples = take(task, 6, seed=0, lengths={'inputs': 64})
  vocabulary = task.output_features['inputs'].vocabulary
  for ex in examples:
    assert ex['inputs'][0] == vocabulary.cls_id and ex['inputs'][-1] == vocabulary.sep_id
    assert ex['loss_weights'].sum() >= 1
  assert 'paragraph' in vocabulary.decode(examples[0]['targets'].tolist()).lower()

  books = tmp_path / 'books.jsonl'
  books.write_text(''.join(json.dumps({'text': f'Chapter {i} begins.\nIt goes on.\nIt ends.'}) + '\n'
                           for i in range(10)))
  mixture = tasks.bert.register_bert_books_wiki_mixture(str(books))
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {'wikipedia_bert_pretraining': 2500.0,
                   'bert_books_wiki_pretraining_bookcorpus': 800.0}
  mixed = list(mixture.get_dataset({'inputs': 64}, shuffle=False, seed=0).take(40)
               .as_numpy_iterator())
  texts = [vocabulary.decode(ex['targets'].tolist()).lower() for ex in mixed]
  assert any('chapter' in t for t in texts) and any('paragraph' in t for t in texts)
