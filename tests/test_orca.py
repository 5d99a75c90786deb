"""Orca-style system messages: the paper's set, sampling by task type, the
template in both layouts and the WIT weights, infer with SYSTEM_MESSAGE, and
explanation-tuning data from a tiny checkpoint that then trains the tiny GPT
instruct gin."""

import hashlib
import json
import math
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import linen as nn

import conftest
from conftest import main_in_process
from t5x_lite import checkpoints
from t5x_lite import infer as infer_lib
from t5x_lite import orca
from t5x_lite import train as train_lib
from t5x_lite.data import feature_converters as fc
from t5x_lite.data import instructions
from t5x_lite.data import settings
from t5x_lite.data import system_messages as sm
from t5x_lite.errors import UserError
from t5x_lite.models import decoder
from t5x_lite.tasks import instructions as ti

TINY = dict(vocab_size=8192, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_layers=1,
            max_positions=160)
TINY_FLAGS = [f'--gin.decoder.GPTConfig.{k}={v}' for k, v in TINY.items()]
ALPACA = os.path.join(conftest.SHARED_DATA, 'instructions', 'alpaca', 'alpaca_en_demo.json')

SENTIMENT = instructions.render_prompt('Classify the sentiment of the review.',
                                       'I loved every minute.')
HAIKU = instructions.render_prompt('Write a haiku about rain.')
LARGER = instructions.render_prompt('Which is larger?\nOPTIONS:\n- 3\n- 5')


@pytest.fixture(autouse=True)
def _default_settings():
  """Each test starts and ends with no run system message."""
  settings.use()
  yield
  settings.use()


def _use(**kwargs):
  settings.use(system_messages=settings.system_message_settings(**kwargs))


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
  return str(path)


# ----------------------------------------------------------------------------
# The set and the sampler.


def test_the_papers_sixteen_messages_and_figure_6():
  messages = sm.ORCA.messages
  assert len(messages) == 16 and messages[0] == ''
  assert messages[6] == ('You are an AI assistant. User will you give you a task. Your goal is '
                         'to complete the task as faithfully as you can. While performing the '
                         'task think step-by-step and justify your steps.')
  assert messages[3].endswith('Think like you are answering to a five year old.')
  assert messages[15] == 'You are an AI assistant that helps people find information.'
  assert messages[11].startswith('User will you give you a task with some instruction. Your '
                                 'job is follow the instructions')  # the paper's wording
  assert '\nPart #: a key part of the definition.\nUsage: ' in messages[14]
  assert len(set(messages)) == 16
  assert sm.ORCA.by_task_type['cot'] == (6, 11, 16)
  assert sm.ORCA.by_task_type['niv2'] == (1, 2, 5, 7, 9, 12, 13, 14, 15)
  assert sm.ORCA.by_task_type['t0'] == (1, 2, 3, 5, 7)
  assert sm.ORCA.by_task_type['flan2021'] == (3, 4, 7)
  assert sm.ORCA.by_task_type['flan2021_multiple_choice'] == (8, 10)


@pytest.mark.parametrize('text,kind', [
    (SENTIMENT, 'classification'),
    (HAIKU, 'generation'),
    (LARGER, 'multiple_choice'),
    ('Is this review positive or negative?\nGreat film.', 'classification'),
    ('Answer yes or no: is water wet?', 'classification'),
    ('Categorize the animals by habitat.', 'classification'),
    ('Which one fits?\n(A) red\n(B) blue', 'multiple_choice'),
    ('Pick the more likely effect:\n- it rained\n- it was sunny\n\n### Response:\n',
     'multiple_choice'),
    ('Rewrite the list:\n- eggs\n- milk\nas one sentence.', 'generation'),  # not at the end
    ('Summarise the article in two sentences.', 'generation'),
])
def test_task_type_of(text, kind):
  assert sm.task_type_of(text) == kind


def _reference(key, ids, seed=0):
  """The documented rule, by hex digits: ids[first 64 bits of SHA-256 mod n]."""
  return ids[int(hashlib.sha256(f'{seed}:{key}'.encode()).hexdigest()[:16], 16) % len(ids)]


def test_sampling_by_task_type_is_seeded_and_keyed():
  # Worked out by hand from the rule (SHA-256 of '<seed>:<prompt>').
  assert sm.sample(SENTIMENT) == (12, sm.ORCA_MESSAGES[11])  # classification: 1, 7 or 12
  assert sm.sample(SENTIMENT, seed=1) == (1, '')             # none at all
  assert sm.sample(HAIKU)[0] == 6                            # generation: 2, 3 or 6
  assert sm.sample(LARGER)[0] == 10                          # multiple choice: 8 or 10
  assert sm.sample(HAIKU, by_task_type=False)[0] == 14       # any of the 16
  assert sm.sample(HAIKU, task_type='cot')[0] in (6, 11, 16)
  keys = [instructions.render_prompt(f'Classify item {i} as spam or not.') for i in range(300)]
  got = [sm.sample(k)[0] for k in keys]
  assert got == [_reference(k, (1, 7, 12)) for k in keys]
  counts = np.bincount(got, minlength=17)
  assert set(np.nonzero(counts)[0]) == {1, 7, 12}
  assert all(counts[i] > 60 for i in (1, 7, 12))  # about 100 each
  assert {sm.sample(k, by_task_type=False)[0] for k in keys} == set(range(1, 17))
  # Keyed by the example: any order gives the same; another seed changes some.
  shuffled = list(np.random.RandomState(0).permutation(len(keys)))
  assert [sm.sample(keys[i])[0] for i in shuffled] == [got[i] for i in shuffled]
  assert [sm.sample(k, seed=1)[0] for k in keys] != got
  with pytest.raises(UserError, match='unknown system message set'):
    sm.sample(HAIKU, set_name='nope')
  with pytest.raises(UserError, match='unknown task type'):
    sm.check_task_type('summarisation')


def test_sampled_messages_follow_the_example_not_the_order(tmp_path):
  rows = [{'instruction': f'Classify review {i} as positive or negative.', 'input': f'text {i}',
           'output': str(i)} for i in range(24)]
  task = ti.register_instruction_task('orca_keyed_gpt', _write(tmp_path / 'a.jsonl', rows),
                                      'alpaca')
  _use(sample_from='orca', seed=3)
  seen = {}
  for seed in (0, 1):
    for ex in task.get_dataset(None, split='train', shuffle=True, seed=seed).as_numpy_iterator():
      seen.setdefault(ex['targets_pretokenized'].decode(), set()).add(
          ex['inputs_pretokenized'].decode())
  for i, r in enumerate(rows):
    key = instructions.render_prompt(r['instruction'], r['input'])
    message = sm.ORCA_MESSAGES[_reference(key, (1, 7, 12), seed=3) - 1]
    assert seen[str(i)] == {instructions.with_system(key, message)}


# ----------------------------------------------------------------------------
# The template in both layouts, and the WIT weights.

SYSTEM = 'You are a careful tutor.'
EXPECTED = ('You are a careful tutor.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n'
            '### Response:\n')


def _one(task, lengths):
  ds = task.get_dataset(lengths, split='train', shuffle=False)
  return ds, next(ds.as_numpy_iterator())


def test_system_message_is_the_templates_prompt_in_both_layouts(tmp_path):
  path = _write(tmp_path / 'a.jsonl', [
      {'instruction': 'Add the numbers.', 'input': '2 3', 'output': '5'},
      {'instruction': 'Add the numbers.', 'input': '2 3', 'output': '5', 'system': 'Be terse.'}])
  chat = tmp_path / 'c.jsonl'
  chat.write_text(json.dumps({'messages': [{'role': 'system', 'content': 'Own.'},
                                           {'role': 'user', 'content': 'Hi'},
                                           {'role': 'assistant', 'content': 'Hello'}]}) + '\n')
  _use(message=SYSTEM)
  lengths = {'inputs': 64, 'targets': 8}
  for name in ('orca_layout_gpt', 'orca_layout'):
    task = ti.register_instruction_task(name, path, 'alpaca')
    vocab = task.output_features['inputs'].vocabulary
    ds, ex = _one(task, lengths)
    assert ex['inputs_pretokenized'].decode() == EXPECTED
    eos = [] if name.endswith('_gpt') else [vocab.eos_id]
    assert ex['inputs'].tolist() == vocab.encode(EXPECTED) + eos
    own = list(ds.as_numpy_iterator())[1]  # a row's own system message wins
    assert own['inputs_pretokenized'].decode() == (
        'Be terse.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n')
    chat_task = ti.register_instruction_task(name + '_chat', str(chat), 'chat')
    assert _one(chat_task, lengths)[1]['inputs_pretokenized'].decode() == (
        'Own.\n\n### Instruction:\nHi\n\n### Response:\n')
    if name.endswith('_gpt'):  # one causal sequence: the system tokens weigh λp
      batch = next(fc.WitFeatureConverter(prompt_weight=0.1, response_weight=0.9)(
          task.get_dataset(lengths, split='train', shuffle=False), lengths)
          .as_numpy_iterator())
      n_prompt, n_response = len(ex['inputs']), len(ex['targets'])
      assert n_prompt > len(vocab.encode(EXPECTED[len(SYSTEM):]))  # the system tokens are in
      assert batch['decoder_target_tokens'][:n_prompt].tolist() == vocab.encode(EXPECTED)
      np.testing.assert_allclose(batch['decoder_loss_weights'][:n_prompt], 0.1)
      np.testing.assert_allclose(batch['decoder_loss_weights'][n_prompt:n_prompt + n_response],
                                 0.9)
      assert batch['decoder_prompt_mask'][:n_prompt + 1].all()
    else:  # encoder-decoder: the system message is encoded, the decoder predicts the response
      batch = next(fc.WitEncDecFeatureConverter(response_weight=0.9)(
          task.get_dataset(lengths, split='train', shuffle=False), lengths)
          .as_numpy_iterator())
      n = len(ex['inputs'])
      assert batch['encoder_input_tokens'][:n].tolist() == vocab.encode(EXPECTED) + eos
      assert batch['decoder_target_tokens'][:len(ex['targets'])].tolist() == ex['targets'].tolist()
      np.testing.assert_allclose(batch['decoder_loss_weights'][:len(ex['targets'])], 0.9)


def test_glue_instructions_and_non_instruction_tasks():
  rows = tf.data.Dataset.from_tensors({'inputs': tf.constant(SENTIMENT)})
  _use(sample_from='orca', seed=1)
  got = next(sm.add_system_message(rows).as_numpy_iterator())['inputs'].decode()
  assert got == SENTIMENT  # message 1, the empty one: no system block
  _use(sample_from='orca')
  got = next(sm.add_system_message(rows).as_numpy_iterator())['inputs'].decode()
  assert got == sm.ORCA_MESSAGES[11] + '\n\n' + SENTIMENT
  import seqio  # pylint: disable=g-import-not-at-top
  assert sm.puts_system_message(seqio.get_mixture_or_task('glue_sst2_instruct_gpt'))
  assert sm.task_type_for(seqio.get_mixture_or_task('sni_task137_gpt')) == 'niv2'
  plain = seqio.get_mixture_or_task('glue_sst2_v002')
  _use(message=SYSTEM)
  with pytest.raises(UserError, match="task 'glue_sst2_v002' has none") as e:
    sm.check_applies([plain])
  assert '\n' not in str(e.value)
  settings.use()
  sm.check_applies([plain])  # no system message: nothing to refuse


def test_gin_file_builds():
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse_gin([os.path.join(conftest.REPO, 'gin', 'gpt_tiny_orca.gin')], [])
    model = gin.query_parameter('generation.model_generator.model').scoped_configurable_fn()
    macro = lambda name: gin.query_parameter(f'{name}/gin.macro.value')
    assert macro('PROMPT_LENGTH') + macro('MAX_DECODE_LENGTH') - 1 <= model.config.max_positions
    assert model.config.vocab_size >= 8100 and model.DECODER_ONLY  # the embedded BPE vocabulary
    assert macro('SYSTEM_MESSAGES') == 'orca' and macro('CHECKPOINT_PATH')
  finally:
    gin.clear_config()


# ----------------------------------------------------------------------------
# A tiny checkpoint: infer, Orca data, training on it.


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A tiny GPT's (random) params written as a checkpoint step."""
  model = decoder.DecoderModel(decoder.GPTConfig(**TINY, dropout_rate=0.0,
                                                 attention_dropout_rate=0.0))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), model.dummy_batch(1, 8)))['params']
  root = tmp_path_factory.mktemp('teacher')
  ckpt = checkpoints.Checkpointer(str(root), 1, async_save=False)
  ckpt.save(1, {'params': params}, data_position=0)
  ckpt.close()
  return os.path.join(str(root), 'checkpoints', '1')


def test_infer_with_a_system_message(teacher, tmp_path):
  task_file = _write(tmp_path / 'task.jsonl', [{'instruction': 'x', 'output': 'y'}])
  ti.register_instruction_task('orca_infer_gpt', task_file, 'alpaca')
  lines = tmp_path / 'prompts.jsonl'
  lines.write_text(json.dumps({'instruction': 'Add the numbers.', 'input': '2 3'}) + '\n'
                   + json.dumps({'instruction': 'Say hi.', 'system': 'Be terse.'}) + '\n')
  flags = ['--gin_file=configs/runs/infer.gin', '--gin_file=gin/gpt_instruct_wit.gin',
           *TINY_FLAGS, f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.CHECKPOINT_PATH='{teacher}'",
           "--gin.MIXTURE_OR_TASK_NAME='orca_infer_gpt'", f"--gin.INPUT_FILE='{lines}'",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}", '--gin.BATCH_SIZE=2',
           f"--gin.SYSTEM_MESSAGE='{SYSTEM}'"]
  main_in_process(infer_lib, flags)
  with open(tmp_path / 'infer' / 'prompts.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [r['inputs'] for r in rows] == [
      EXPECTED, 'Be terse.\n\n### Instruction:\nSay hi.\n\n### Response:\n']
  assert all(isinstance(r['outputs'], str) for r in rows)
  with pytest.raises(UserError, match='--raw_inputs'):
    main_in_process(infer_lib, flags + ['--raw_inputs'])


def test_eval_with_a_system_message(teacher, tmp_path):
  """eval puts SYSTEM_MESSAGE before each validation prompt that has none of its
  own, as infer does."""
  from t5x_lite import eval as eval_lib  # pylint: disable=g-import-not-at-top
  rows = [{'instruction': 'Add the numbers.', 'input': '2 3', 'output': '5'},
          {'instruction': 'Say hi.', 'system': 'Be terse.', 'output': 'hi'}]
  path = _write(tmp_path / 'valid.jsonl', rows)
  ti.register_instruction_task('orca_eval_gpt', path, 'alpaca', validation_paths=path)
  flags = ['--gin_file=configs/runs/eval.gin', '--gin_file=gin/gpt_instruct_wit.gin',
           *TINY_FLAGS, f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.CHECKPOINT_PATH='{teacher}'",
           "--gin.MIXTURE_OR_TASK_NAME='orca_eval_gpt'",
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 4}", '--gin.BATCH_SIZE=2',
           f"--gin.SYSTEM_MESSAGE='{SYSTEM}'"]
  main_in_process(eval_lib, flags)
  with open(tmp_path / 'eval' / 'orca_eval_gpt.jsonl') as f:
    got = [json.loads(line) for line in f]
  assert [r['inputs'] for r in got] == [
      EXPECTED, 'Be terse.\n\n### Instruction:\nSay hi.\n\n### Response:\n']


def test_orca_rows_and_stats_with_a_stub_teacher(tmp_path):
  rows = [{'instruction': 'Classify the sentiment of the review.', 'input': 'I loved every minute.',
           'output': 'old'},
          {'instruction': 'Write a haiku about rain.', 'output': 'old'},
          {'instruction': 'Which is larger?\nOPTIONS:\n- 3\n- 5', 'output': 'old'},
          {'instruction': 'Say hi.', 'system': 'Be terse.', 'output': 'old'}]
  path = _write(tmp_path / 'in.jsonl', rows)
  prompts = []

  def generate(batch):
    prompts.extend(batch)
    return [' Because. ' if 'haiku' not in p else '  ' for p in batch]

  options = dict(instructions_path=path, chunk_size=2)
  stats = orca.generate_data(output_dir=str(tmp_path / 'o'), generate=generate, **options)
  assert prompts == [sm.ORCA_MESSAGES[11] + '\n\n' + SENTIMENT, sm.ORCA_MESSAGES[5] + '\n\n' + HAIKU,
                     sm.ORCA_MESSAGES[9] + '\n\n' + LARGER,
                     'Be terse.\n\n' + instructions.render_prompt('Say hi.')]
  with open(stats['files']['data']) as f:
    out = [json.loads(line) for line in f]
  assert out == [
      {'system': sm.ORCA_MESSAGES[11], 'instruction': rows[0]['instruction'],
       'input': rows[0]['input'], 'output': 'Because.'},
      {'system': sm.ORCA_MESSAGES[9], 'instruction': rows[2]['instruction'], 'input': '',
       'output': 'Because.'},
      {'system': 'Be terse.', 'instruction': 'Say hi.', 'input': '', 'output': 'Because.'}]
  assert stats['instructions'] == 4 and stats['rows'] == 3 and stats['dropped_empty'] == 1
  assert {k: v for k, v in stats['per_system_message'].items() if v} == {
      '12': 1, '6': 1, '10': 1, 'own': 1}
  assert stats['per_task_type'] == {'classification': 1, 'generation': 2, 'multiple_choice': 1}
  assert stats['resumed'] == 0 and stats['generation'] is None
  assert json.load(open(stats['files']['stats'])) == stats
  again = orca.generate_data(output_dir=str(tmp_path / 'b'), generate=generate, **options)
  assert open(again['files']['data']).read() == open(stats['files']['data']).read()
  with pytest.raises(UserError, match='DECODE_METHOD'):
    orca.generate_data(output_dir=str(tmp_path / 'c'), generate=generate, decode_method='beam',
                       **options)


def test_orca_resumes_from_its_log(tmp_path):
  """A run stopped after its first batch generates only the rest when run again,
  and its output equals an uninterrupted run's; other settings are one line."""
  rows = [{'instruction': f'Write a poem about the number {i}.', 'output': ''} for i in range(5)]
  path = _write(tmp_path / 'in.jsonl', rows)
  calls = []

  def generate(batch):
    calls.append(len(batch))
    return [f'Poem {p.count("number")}{len(p)}.' for p in batch]

  def failing(batch):
    if calls:
      raise KeyboardInterrupt
    return generate(batch)

  options = dict(instructions_path=path, chunk_size=2)
  whole = orca.generate_data(output_dir=str(tmp_path / 'whole'), generate=generate, **options)
  calls.clear()
  with pytest.raises(KeyboardInterrupt):
    orca.generate_data(output_dir=str(tmp_path / 'cut'), generate=failing, **options)
  assert calls == [2]
  calls.clear()
  again = orca.generate_data(output_dir=str(tmp_path / 'cut'), generate=generate, **options)
  assert calls == [2, 1] and again['resumed'] == 2
  assert open(again['files']['data']).read() == open(whole['files']['data']).read()
  with pytest.raises(UserError, match='system_message_seed'):
    orca.generate_data(output_dir=str(tmp_path / 'cut'), generate=generate,
                       system_message_seed=1, **options)
  again = orca.generate_data(output_dir=str(tmp_path / 'cut'), generate=generate,
                             system_message_seed=1, resume=False, **options)
  assert again['resumed'] == 0


def test_orca_end_to_end_then_trains_the_instruct_gin(teacher, tmp_path):
  conftest.require_shared_data('instructions', 'alpaca', 'alpaca_en_demo.json')
  out_dir = tmp_path / 'orca'
  main_in_process(orca, [
      '--gin_file=gin/gpt_tiny_orca.gin', *TINY_FLAGS, f"--gin.CHECKPOINT_PATH='{teacher}'",
      f"--gin.OUTPUT_DIR='{out_dir}'", f"--gin.INSTRUCTIONS='{ALPACA}'",
      '--gin.NUM_INSTRUCTIONS=12', '--gin.BATCH_SIZE=12', '--gin.PROMPT_LENGTH=128',
      '--gin.MAX_DECODE_LENGTH=8'])
  stats = json.load(open(out_dir / 'orca_stats.json'))
  with open(out_dir / 'orca.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert stats['instructions'] == 12 == stats['rows'] + stats['dropped_empty']
  assert sum(stats['per_system_message'].values()) == 12 == sum(stats['per_task_type'].values())
  assert len(rows) == stats['rows'] > 0
  usage = stats['generation']
  assert usage['prompts'] == 12 and usage['tokens'] > 0 and usage['tokens_per_second'] > 0
  assert stats['seconds'] >= usage['seconds'] > 0
  demo = json.load(open(ALPACA))[:12]
  by_instruction = {r['instruction']: r for r in rows}
  for r in demo:  # each kept row's message is the one the sampler draws for it
    if r['instruction'] in by_instruction:
      got = by_instruction[r['instruction']]
      assert got['system'] == sm.sample(instructions.render_prompt(r['instruction'],
                                                                   r['input']))[1]
      assert got['input'] == r['input'] and got['output'] and got['output'] != r['output']
  # The rows train the tiny GPT instruct gin as an instruction task.
  ti.register_instruction_task('orca_rows_gpt', str(out_dir / 'orca.jsonl'), 'alpaca')
  model_dir = tmp_path / 'student'
  main_in_process(train_lib, [
      '--gin_file=gin/gpt_instruct_wit.gin', *TINY_FLAGS, f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='orca_rows_gpt'", '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=2',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 16}", '--gin.EVAL_PERIOD=0',
      '--gin.CHECKPOINT_PERIOD=2', '--gin.WARMUP_STEPS=1',
      '--gin.train_script.train.progress_bar=False'])
  metrics = conftest.read_metrics(str(model_dir))
  assert metrics[-1]['step'] == 2 and math.isfinite(metrics[-1]['loss'])


def test_orca_with_an_imported_hugging_face_teacher(tmp_path):
  """A GPT-2 directory with its own tokenizer, through import_hf's checkpoint and
  model.gin: the teacher's greedy responses equal transformers' greedy
  generation from the same prompt tokens."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from t5x_lite import import_hf  # pylint: disable=g-import-not-at-top
  text = [m for m in sm.ORCA_MESSAGES if m] + [SENTIMENT, HAIKU, LARGER]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(text * 5, trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf_dir, imported = tmp_path / 'gpt2', tmp_path / 'imported'
  theirs = transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>',
                                          bos_token='<|endoftext|>')
  theirs.save_pretrained(hf_dir)
  config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2,
                                   n_head=2, n_positions=64, eos_token_id=0, bos_token_id=0,
                                   initializer_range=0.5)  # argmaxes far from ties
  torch.manual_seed(0)
  hf_model = transformers.GPT2LMHeadModel(config).eval()
  hf_model.save_pretrained(hf_dir)
  import_hf.import_hf(str(hf_dir), str(imported))
  rows = [{'instruction': 'Classify the sentiment of the review.', 'input': 'I loved it.'},
          {'instruction': 'Write a haiku about rain.'}]
  path = _write(tmp_path / 'in.jsonl', rows)
  out_dir = tmp_path / 'orca'
  main_in_process(orca, [
      '--gin_file=configs/runs/orca.gin', f"--gin_file={imported / 'model.gin'}",
      f"--gin.CHECKPOINT_PATH='{imported / 'checkpoint'}'", f"--gin.OUTPUT_DIR='{out_dir}'",
      f"--gin.INSTRUCTIONS='{path}'", "--gin.DECODE_METHOD='greedy'", '--gin.BATCH_SIZE=2',
      '--gin.PROMPT_LENGTH=40', '--gin.MAX_DECODE_LENGTH=8'])
  with open(out_dir / 'orca_log.jsonl') as f:
    texts = [json.loads(line)['text'] for line in list(f)[1:]]
  prompts = [p['prompt'] for p in orca.plan(orca.read_instructions(path))]
  for prompt, got in zip(prompts, texts):
    ids = [0] + theirs(prompt)['input_ids'][-39:]  # BOS, then the prompt's end
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              eos_token_id=0, pad_token_id=0)[0, len(ids):].tolist()
    want = out[:out.index(0)] if 0 in out else out
    assert got == theirs.decode(want)
  assert len(texts) == 2 and any(texts)
