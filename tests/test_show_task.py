"""`python -m t5x_lite.show_task`: a task's examples as JSON lines.

References: the first rows of the shared SST-2 / CoLA dev files written out by
hand, the task's vocabulary encoding the printed text, the embedded corpus's
documents read from `t5x_lite.data.corpus`, and seqio's own mixture sampling.
"""

import json
import subprocess
import sys

import gin
import pytest
import seqio

from conftest import REPO, require_shared_data
from t5x_lite import gin_utils
from t5x_lite import show_task
from t5x_lite.data import corpus
from t5x_lite.data import settings
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
import t5x_lite.tasks  # pylint: disable=unused-import  (registers the tasks)

# The first three rows of ../shared/data/glue/SST-2/dev.tsv, as T5 formats them.
SST2_LINES = [
    '{"inputs": "sst2 sentence: it \'s a charming and often affecting journey . ", '
    '"targets": "positive", "idx": 0}',
    '{"inputs": "sst2 sentence: unflinchingly bleak and desperate ", '
    '"targets": "negative", "idx": 1}',
    '{"inputs": "sst2 sentence: allows us to hope that nolan is poised to embark a major '
    'career as a commercial yet inventive filmmaker . ", "targets": "positive", "idx": 2}',
]
MIXTURE = 'show_task_test_sst2_cola'


@pytest.fixture(autouse=True)
def clean_config():
  yield
  gin.clear_config()
  settings.use()


@pytest.fixture(scope='module')
def files_gin(tmp_path_factory):
  """A gin file that reads GLUE from the shared files."""
  glue = require_shared_data('glue')
  path = tmp_path_factory.mktemp('show_task') / 'glue_files.gin'
  path.write_text('from __gin__ import dynamic_registration\n'
                  'from t5x_lite.data import glue_sources\n'
                  'glue_sources.data_settings:\n'
                  "  source = 'files'\n"
                  f"  glue_dir = '{glue}'\n")
  return str(path)


def _lines(capsys):
  return capsys.readouterr().out.splitlines()


def test_sst2_lines_from_the_files_a_gin_file_names(files_gin, capsys):
  show_task.main(['--task=glue_sst2_v002', '--num_examples=3', f'--gin_file={files_gin}'])
  assert _lines(capsys) == SST2_LINES


def test_tokens_are_the_vocabularys_encoding_and_decode_back(files_gin, capsys):
  show_task.main(['--task=glue_sst2_v002', '--num_examples=2', '--tokens',
                  f'--gin_file={files_gin}'])
  vocab = vocab_lib.embedded_vocabulary()
  rows = [json.loads(line) for line in _lines(capsys)]
  assert [r['targets'] for r in rows] == ['positive', 'negative']
  for row in rows:
    for key in ('inputs', 'targets'):
      ids = row[f'{key}_ids']
      assert ids == vocab.encode(row[key]) + [vocab.eos_id]
      assert vocab.decode(ids) == ' '.join(row[key].split())


def test_the_command_line_prints_the_same_lines(files_gin):
  proc = subprocess.run(
      [sys.executable, '-m', 't5x_lite.show_task', '--task=glue_sst2_v002',
       '--num_examples=3', f'--gin_file={files_gin}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == SST2_LINES


def test_embedded_lm_chunks_are_the_corpus_documents_with_eos_marked(capsys):
  """The causal-LM chunks keep no pretokenized text: the ids are decoded,
  the EOS between documents written '</s>'."""
  vocab = vocab_lib.embedded_bpe_vocabulary()
  first, second = corpus.split_documents('validation')[:2]
  length = len(vocab.encode(first)) + 9  # the first document, EOS, 8 tokens of the next
  show_task.main(['--task=embedded_lm', '--num_examples=1', '--tokens',
                  f'--lengths=targets:{length}'])
  (row,) = [json.loads(line) for line in _lines(capsys)]
  assert list(row) == ['targets', 'targets_ids']
  assert row['targets_ids'] == (vocab.encode(first) + [vocab.eos_id]
                                + vocab.encode(second)[:8])
  head, tail = row['targets'].split(show_task.EOS_MARK)
  assert head == first
  assert second.startswith(tail) and len(tail) > 10


def test_a_mixture_is_sampled_as_training_samples_it(files_gin):
  """The texts come in seqio's own sampling order for the seed, and each
  line names the task its text belongs to."""
  require_shared_data('glue', 'CoLA')
  gin_utils.parse_gin([files_gin], [])
  seqio.MixtureRegistry.remove(MIXTURE)
  mixture = seqio.MixtureRegistry.add(MIXTURE, [('glue_sst2_v002', 1), ('glue_cola_v002', 1)])
  try:
    rows = show_task.examples(MIXTURE, num_examples=8, seed=3)
    lengths = show_task.DEFAULT_LENGTHS
    reference = mixture.get_dataset(lengths, split='validation', shuffle=True, seed=3,
                                    num_epochs=None, copy_pretokenized=True,
                                    shard_info=seqio.ShardInfo(0, 1))
    expected = [x['inputs_pretokenized'].decode()
                for x in reference.take(8).as_numpy_iterator()]
  finally:
    seqio.MixtureRegistry.remove(MIXTURE)
  assert [r['inputs'] for r in rows] == expected
  prefix = {'glue_sst2_v002': 'sst2 sentence: ', 'glue_cola_v002': 'cola sentence: '}
  assert {r['task'] for r in rows} == set(prefix)
  for row in rows:
    assert row['inputs'].startswith(prefix[row['task']]), row
    assert list(row) == ['task', 'inputs', 'targets']


def test_unknown_task_names_the_closest():
  with pytest.raises(UserError, match=r"no task or mixture named 'glue_sst_v002'; "
                                      r'did you mean glue_sst2_v002'):
    show_task.main(['--task=glue_sst_v002'])


def test_unknown_split_names_the_splits(files_gin):
  with pytest.raises(UserError, match=r"glue_sst2_v002 has no 'dev' split; its splits are "
                                      r'train, validation, test'):
    show_task.main(['--task=glue_sst2_v002', '--split=dev', f'--gin_file={files_gin}'])


def test_default_split_falls_back_where_there_is_no_validation(capsys):
  assert show_task.resolve_split('wikipedia_bert_pretraining') == 'train'
  assert "has no 'validation' split; showing 'train'" in capsys.readouterr().err
  assert show_task.resolve_split('embedded_lm') == 'validation'


def test_an_error_is_one_line_and_exit_status_2(monkeypatch, capsys):
  monkeypatch.setattr(sys, 'argv', ['show_task', '--task=embedded_lm', '--num_examples=0'])
  with pytest.raises(SystemExit) as exit_info:
    gin_utils.run(show_task.main, 'show_task')
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['error: --num_examples=0: show at least 1 example.']

