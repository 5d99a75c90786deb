"""`python -m t5x_lite.infer` from INPUT_FILE alone, for every family and head:
a T5 text-to-text, a BERT and a GPT-1 classifier and a GPT language model, each
trained here for a few steps on a hand-written SST-2 (or the embedded corpus),
then read back with the run's config.gin and no dataset anywhere."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

import t5x_lite.tasks  # noqa: F401  (registers the tasks)
from conftest import main_in_process
from t5x_lite import infer as infer_lib
from t5x_lite import infer_inputs
from t5x_lite import train as train_lib
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError

STEPS = 2
# Dev sentences (also the training rows) and their SST-2 label.
SENTENCES = (('a gorgeous , witty film .', 1), ('dull and slow .', 0),
             ('the best film of the year .', 1), ('a tedious mess .', 0))
TINY = {
    't5': ['--gin_file=gin/t5_tiny_sst2_finetune.gin',
           *[f'--gin.encoder_decoder.T5Config.{k}={v}' for k, v in (
               ('emb_dim', 32), ('num_heads', 2), ('head_dim', 16), ('mlp_dim', 64),
               ('num_encoder_layers', 1), ('num_decoder_layers', 1))],
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"],
    'bert_cls': ['--gin_file=gin/bert_tiny_sst2_finetune.gin',
                 *[f'--gin.encoder.BertConfig.{k}={v}' for k, v in (
                     ('emb_dim', 16), ('num_heads', 2), ('head_dim', 8), ('mlp_dim', 32),
                     ('num_layers', 1), ('max_positions', 32))],
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}"],
    'gpt_cls': ['--gin_file=gin/gpt_tiny_sst2_cls_finetune.gin',
                *[f'--gin.decoder.GPTConfig.{k}={v}' for k, v in (
                    ('emb_dim', 16), ('num_heads', 2), ('head_dim', 8), ('mlp_dim', 32),
                    ('num_layers', 1), ('max_positions', 32))],
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}"],
    'gpt_lm': ['--gin_file=gin/gpt_tiny_lm.gin',
               *[f'--gin.decoder.GPTConfig.{k}={v}' for k, v in (
                   ('emb_dim', 16), ('num_heads', 2), ('head_dim', 8), ('mlp_dim', 32),
                   ('num_layers', 1), ('max_positions', 64))],
               "--gin.TASK_FEATURE_LENGTHS={'targets': 16}"],
}


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('infer')
  sst2 = root / 'glue' / 'SST-2'
  sst2.mkdir(parents=True)
  tsv = 'sentence\tlabel\n' + ''.join(f'{s}\t{l}\n' for s, l in SENTENCES)
  for name in ('train.tsv', 'dev.tsv'):
    (sst2 / name).write_text(tsv)
  (root / 'empty').mkdir()
  return root


@pytest.fixture(scope='module')
def trained(dirs):
  """family -> MODEL_DIR of a run trained STEPS steps (evaluated at the last one).
  make test runs this module on one xdist worker (conftest.ONE_WORKER_MODULES),
  which trains once."""
  out = {}
  for family, flags in TINY.items():
    model_dir = str(dirs / family)
    main_in_process(train_lib, [*flags, f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={STEPS}',
                      '--gin.BATCH_SIZE=4', f'--gin.CHECKPOINT_PERIOD={STEPS}',
                      *([f'--gin.EVAL_PERIOD={STEPS}'] if family != 'gpt_lm' else []),
                      f"--gin.glue_sources.data_settings.glue_dir='{dirs / 'glue'}'",
                      '--gin.train_script.train.progress_bar=False'])
    out[family] = model_dir
  return out


def _infer(dirs, model_dir, lines, name='prompts.txt', *extra):
  """infer's JSONL rows for `lines`, with the run's config.gin and no dataset."""
  path = dirs / name
  path.write_text(''.join(l + '\n' for l in lines))
  out = str(dirs / 'out')
  main_in_process(infer_lib, ['--gin_file=configs/runs/infer.gin', f'--gin_file={model_dir}/config.gin',
                    f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INPUT_FILE='{path}'",
                    f"--gin.MODEL_DIR='{out}'", "--gin.glue_sources.data_settings.source='files'",
                    f"--gin.glue_sources.data_settings.glue_dir='{dirs / 'empty'}'",
                    "--gin.glue_sources.data_settings.tfds_data_dir='/nonexistent'", *extra])
  stem = os.path.splitext(name)[0]
  with open(os.path.join(out, 'infer', f'{stem}.jsonl')) as f:
    return [json.loads(l) for l in f]


def _eval_rows(model_dir, task):
  with open(os.path.join(model_dir, 'eval', str(STEPS), f'{task}.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_t5_formats_lines_as_the_task_and_matches_eval(dirs, trained):
  rows = _infer(dirs, trained['t5'], ['', SENTENCES[1][0], SENTENCES[2][0]])
  assert [r['line'] for r in rows] == [2, 3]  # the empty first line is skipped
  assert [r['inputs'] for r in rows] == ['sst2 sentence: dull and slow .',
                                         'sst2 sentence: the best film of the year .']
  reference = {r['inputs']: r for r in _eval_rows(trained['t5'], 'glue_sst2_v002')}
  for row in rows:
    assert row['outputs'] == reference[row['inputs']]['prediction']
    assert row['score'] == pytest.approx(reference[row['inputs']]['score'], abs=1e-4)
  # --raw_inputs: the line itself is the encoder input, so the formatted text
  # given raw reads exactly as the plain sentence formatted.
  raw = _infer(dirs, trained['t5'], ['sst2 sentence: dull and slow .', 'dull and slow .'],
               'raw.txt', '--raw_inputs')
  assert [r['inputs'] for r in raw] == ['sst2 sentence: dull and slow .', 'dull and slow .']
  assert raw[0]['outputs'] == rows[0]['outputs']
  assert raw[0]['score'] == pytest.approx(rows[0]['score'], abs=1e-4)


def test_raw_inputs_feed_the_line_as_is():
  task = seqio.get_mixture_or_task('glue_sst2_v002')
  vocab = vocab_lib.embedded_vocabulary()
  line = [infer_inputs.Line(1, 'dull and slow .')]
  lengths = {'inputs': 32, 'targets': 8}
  raw, = infer_inputs.examples(task, line, lengths, 'p.txt', raw=True)
  formatted, = infer_inputs.examples(task, line, lengths, 'p.txt')
  assert raw[0]['inputs'].tolist() == vocab.encode('dull and slow .') + [1]
  assert formatted[0]['inputs'].tolist() == vocab.encode('sst2 sentence: dull and slow .') + [1]


@pytest.mark.parametrize('family', ['bert_cls', 'gpt_cls'])
def test_classifier_gives_the_label_word_of_eval(dirs, trained, family):
  sentences = [s for s, _ in SENTENCES]
  rows = _infer(dirs, trained[family], sentences)
  assert [r['inputs'] for r in rows] == sentences
  reference = {r['inputs']: r for r in _eval_rows(trained[family], 'glue_sst2_v002_cls')}
  for row in rows:
    assert row['outputs'] == ('negative', 'positive')[reference[row['inputs']]['prediction']]
    assert row['score'] == pytest.approx(reference[row['inputs']]['score'], abs=1e-4)


def test_gpt_lm_continues_the_prompt_as_greedy_decoding(dirs, trained):
  """The continuation equals greedy decoding by full forward passes (no cache)."""
  prompt = 'The function returns'
  row, = _infer(dirs, trained['gpt_lm'], [prompt])
  assert row['inputs'] == prompt
  from t5x_lite import evaluation, partitioning, runs  # pylint: disable=g-import-not-at-top
  from t5x_lite.models import decoder  # pylint: disable=g-import-not-at-top
  cfg = decoder.GPTConfig(vocab_size=8192, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_layers=1, max_positions=64, dropout_rate=0.0,
                          attention_dropout_rate=0.0, activation='gelu', layer_norm_eps=1e-5)
  model = decoder.DecoderModel(cfg)
  partitioner = partitioning.Partitioner()
  params = evaluation.load_params(model, partitioner, trained['gpt_lm'],
                                  runs.converter_batch_shapes(model, {'targets': 16}, 4, False))
  vocab = vocab_lib.embedded_bpe_vocabulary()
  ids = [0] + vocab.encode(prompt)
  logits = jax.jit(lambda p, t, m: model.logits(p, {'decoder_input_tokens': t,
                                                    'decoder_attention_mask': m}))
  generated, score = [], 0.0
  for _ in range(16):
    tokens = np.zeros([1, 64], np.int32)
    tokens[0, :len(ids)] = ids
    real = (np.arange(64) < len(ids))[None].astype(np.int32)
    step = logits(params, tokens, real)[0, len(ids) - 1]
    nxt = int(jnp.argmax(step))
    score += float(jax.nn.log_softmax(step)[nxt])
    if nxt == vocab.eos_id:
      break
    generated.append(nxt)
    ids.append(nxt)
  assert generated and row['outputs'] == vocab.decode(generated)
  assert row['score'] == pytest.approx(score, abs=1e-3)  # the prompt attended causally


def test_multi_field_tasks_read_jsonl_fields():
  rte = seqio.get_mixture_or_task('glue_rte_v002')
  line = infer_inputs.Line(1, '', {'sentence1': 'It rains.', 'sentence2': 'It is wet.'})
  ex, = infer_inputs.examples(rte, [line], {'inputs': 64, 'targets': 8}, 'p.jsonl')[0]
  assert ex['inputs_pretokenized'].decode() == 'rte sentence1: It rains. sentence2: It is wet.'
  mnli = seqio.get_mixture_or_task('glue_mnli_v002_cls')
  line = infer_inputs.Line(1, '', {'premise': 'It rains.', 'hypothesis': 'It is wet.'})
  ex, = infer_inputs.examples(mnli, [line], {'inputs': 64}, 'p.jsonl')[0]
  vocab = wordpiece.embedded_wordpiece_vocabulary()
  assert ex['text_a'].tolist() == vocab.encode('It rains.')
  assert ex['text_b'].tolist() == vocab.encode('It is wet.')
  with pytest.raises(UserError, match=r'p.txt:1: task glue_rte_v002 reads the fields '
                                      r'sentence1, sentence2; give INPUT_FILE as a .jsonl'):
    infer_inputs.examples(rte, [infer_inputs.Line(1, 'It rains.')], {'inputs': 64}, 'p.txt')


def test_instruction_task_applies_template_and_system_prompt():
  from t5x_lite.tasks import instructions  # pylint: disable=g-import-not-at-top
  task = instructions.register_instruction_task(
      'infer_test_chat_gpt', '/nonexistent/*.jsonl', format='chat',
      system_prompt='Be brief.')
  lines = [infer_inputs.Line(1, 'Name a colour.'),
           infer_inputs.Line(2, '', {'messages': [{'role': 'user', 'content': 'Hi'},
                                                  {'role': 'assistant', 'content': 'Hello'},
                                                  {'role': 'user', 'content': 'Bye'}]})]
  got = infer_inputs.examples(task, lines, {'inputs': 64, 'targets': 8}, 'p.jsonl')
  assert [g[0]['inputs_pretokenized'] for g in got] == [
      'Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\n',
      'Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n'
      '### Instruction:\nBye\n\n### Response:\n']
  seqio.TaskRegistry.remove('infer_test_chat_gpt')


def test_preference_task_reads_lines_as_prompts():
  """A DPO run's config.gin names a preference task: its prompt template applies."""
  task = infer_lib._file_task('dpo_en_demo', None)  # pylint: disable=protected-access
  got, = infer_inputs.examples(task, [infer_inputs.Line(1, 'Say hi.')],
                               {'inputs': 64, 'targets': 8}, 'p.txt')
  assert got[0]['inputs_pretokenized'] == '### Instruction:\nSay hi.\n\n### Response:\n'


def test_malformed_jsonl_line_is_one_line_naming_file_and_line(tmp_path):
  path = tmp_path / 'rows.jsonl'
  path.write_text('{"sentence": "fine"}\n{"sentence": broken\n')
  with pytest.raises(UserError) as e:
    infer_inputs.read(str(path))
  assert str(e.value).startswith(f'{path}:2: not valid JSON') and '\n' not in str(e.value)
