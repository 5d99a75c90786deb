"""Self-Instruct: filters, prompt format, parsers, and the loop end to end."""

import json
import os
import re

import pytest
from rouge_score import rouge_scorer

import conftest
from t5x_lite import self_instruct as si
from t5x_lite.errors import UserError
from t5x_lite.models import decoder

SEEDS = os.path.join(conftest.SHARED_DATA, 'instructions', 'self_instruct', 'seed_tasks.jsonl')
POOL = ['Write a short poem about the sea.', 'Sort the given numbers in ascending order.']


@pytest.fixture
def shared_seeds():
  """Self-Instruct's seed tasks, from the shared data."""
  return conftest.require_shared_data('instructions', 'self_instruct', 'seed_tasks.jsonl')


def _rouge(a, b):
  return rouge_scorer.RougeScorer(['rougeL']).score(a, b)['rougeL'].fmeasure


def _lcs_f(a, b):
  """ROUGE-L F of lowercase alphanumeric word lists, by dynamic programming."""
  x, y = re.findall(r'[a-z0-9]+', a.lower()), re.findall(r'[a-z0-9]+', b.lower())
  t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
  for i, u in enumerate(x):
    for j, v in enumerate(y):
      t[i + 1][j + 1] = t[i][j] + 1 if u == v else max(t[i][j + 1], t[i + 1][j])
  lcs = t[-1][-1]
  return 0.0 if not lcs else 2 * lcs / (len(x) + len(y))


@pytest.mark.parametrize('candidate', [
    'Write a short poem about the moon.',        # 6 of 7 words shared
    'Write a short story about the sea.',        # 6 of 7
    'Write a poem about a storm at the sea.',    # near the threshold
    'Write a long essay on climate policy.',     # far
    'Sort the numbers in descending order.',
])
def test_rouge_duplicate_threshold(candidate):
  best = max(_rouge(p, candidate) for p in POOL)
  assert best == pytest.approx(max(_lcs_f(p, candidate) for p in POOL))
  assert si.max_rouge(si.make_scorer(), candidate, POOL) == pytest.approx(best)
  want = 'duplicate' if best >= si.ROUGE_THRESHOLD else None
  assert si.filter_reason(candidate, POOL) == want


@pytest.mark.parametrize('text, reason', [
    ('', 'empty'), ('   ', 'empty'),
    ('Summarise text.', 'too_short'),
    ('Explain it please.', None),
    (' '.join(['word'] * 150), None),
    (' '.join(['word'] * 151), 'too_long'),
    ('Draw a cat for the given animal.', 'keyword'),
    ('Describe the image of the city.', 'keyword'),
    ('Give directions to go to the station.', 'keyword'),
    ('Make a FLOWCHART of the process.', 'keyword'),
    ('Describe the mapping between two sets.', None),  # whole words only
    ('Name the profile of a typical user.', None),
    ('(Explain the rule of three.', 'punctuation'),
    ('- List three fruits you like.', 'punctuation'),
    ('Écrivez une phrase en anglais.', 'non_english'),
    ('写 a poem about autumn leaves.', 'non_english'),
])
def test_filters(text, reason):
  assert si.filter_reason(text, POOL) == reason


def test_prompt_format():
  insts = [f'Task number {i} here.' for i in range(1, 9)]
  prompt = si.encode_prompt(insts)
  lines = prompt.split('\n')
  assert lines[0] == 'Come up with a series of tasks:'
  assert lines[1:9] == [f'{i}. Task number {i} here.' for i in range(1, 9)]
  assert lines[9] == '9.'
  assert si.encode_prompt(['Multi\nline  task.']) == 'Come up with a series of tasks:\n1. Multi line task.\n2.'
  cls = si.classification_prompt([('Is it spam?', True), ('Write a poem.', False)], 'New task.')
  assert cls.startswith(si.CLASSIFICATION_QUESTION)
  assert 'Task: Is it spam?\nIs it classification? Yes\n' in cls
  assert 'Task: Write a poem.\nIs it classification? No\n' in cls
  assert cls.endswith('Task: New task.\nIs it classification?')
  demo = {'instruction': 'Add the numbers.', 'instances': [{'input': '1 2', 'output': '3'}]}
  assert si.input_first_prompt([demo], 'X.').endswith(
      'Task: Add the numbers.\nExample 1\nInput: 1 2\nOutput: 3\n\nTask: X.\n')
  assert si.output_first_prompt([demo], 'X.').endswith(
      'Task: Add the numbers.\nClass label: 3\nInput: 1 2\n\nTask: X.\n')


def test_parsers():
  gen = ' Give three tips for sleep.\n10. Name a primary colour.\n11 . Translate to French.\n'
  assert si.parse_instructions(gen) == ['Give three tips for sleep.', 'Name a primary colour.',
                                        'Translate to French.']
  assert si.parse_instructions(gen + '12. ') == si.parse_instructions(gen) + ['']
  assert si.parse_instructions('') == ['']
  pairs, bad = si.parse_input_first(
      'Example 1\nInput: 2 3\nOutput: 5\nExample 2\nOutput: 7\nExample 3\nInput: only\n'
      'Task: another task')
  assert pairs == [('2 3', '5'), ('', '7')] and bad == 1
  pairs, bad = si.parse_output_first(
      'noise\nClass label: Positive\nInput: I love it.\nClass label: Negative\nInput: Bad.\n'
      'Class label: Neutral\nTask: next')
  assert pairs == [('I love it.', 'Positive'), ('Bad.', 'Negative'), ('', 'Neutral')]
  assert bad == 1
  assert si.parse_yes_no(' Yes\nTask') and si.parse_yes_no('yes.')
  assert not si.parse_yes_no(' No') and not si.parse_yes_no('') and not si.parse_yes_no('Yesterday')
  seen = {('a', 'b')}
  assert si.instance_filter_reason('a', '', seen) == 'empty_output'
  assert si.instance_filter_reason('x', 'x', seen) == 'output_equals_input'
  assert si.instance_filter_reason('a', 'b', seen) == 'duplicate'
  assert si.instance_filter_reason('a', 'c', seen) is None


def _check_run(stats, tasks, rows, seed_tasks):
  inst = stats['instructions']
  assert inst['generated'] == inst['kept'] + sum(inst['filtered'].values())
  assert inst['kept'] == len(tasks)
  assert sum(stats['classification'].values()) == len(tasks)
  ins = stats['instances']
  assert ins['generated'] == ins['kept'] + sum(ins['filtered'].values())
  assert ins['kept'] == len(rows) == stats['rows']
  pool = [t['instruction'] for t in seed_tasks]
  for t in tasks:  # in pool order: each passed the filters against the pool before it
    assert si.filter_reason(t['instruction'], pool) is None
    pool.append(t['instruction'])


def _stub(prompt):
  """Known continuations for each prompt kind."""
  if prompt.startswith(si.CLASSIFICATION_QUESTION):
    return ' Yes' if 'sentiment' in prompt.rsplit('Task:', 1)[1] else ' No'
  if prompt.startswith(si.OUTPUT_FIRST_HEADER[:40]):
    return 'Class label: Positive\nInput: Great film.\nClass label: Positive\nInput: Great film.\n'
  if prompt.startswith(si.INPUT_FIRST_HEADER[:40]):
    return 'Example 1\nInput: abc\nOutput: cba\nExample 2\nInput: same\nOutput: same\nExample 3\nInput: cut off'
  n = prompt.count('\n')  # depends on the prompt, so rounds differ
  return (f' Classify the sentiment of review number {n} today.\n10. Draw a map.\n'
          f'11. Reverse the letters of word {n} in the given text.\n12. Short one.\n'
          f'13. Reverse the letters of word {n} in the given text.\n')


@pytest.mark.usefixtures('shared_seeds')
def test_generate_data_with_stub(tmp_path):
  seed_tasks = si.load_seed_tasks(SEEDS)
  assert len(seed_tasks) == 175
  prompts_seen = []

  def generate(prompts):
    prompts_seen.append(list(prompts))
    return [_stub(p) for p in prompts]

  stats = si.self_instruct(model=decoder.DecoderModel(decoder.GPTConfig()),
                           checkpoint_path=None, output_dir=str(tmp_path), seed_tasks=SEEDS,
                           num_rounds=3, prompts_per_round=2, generate=generate)
  tasks = [json.loads(line) for line in open(stats['files']['tasks'])]
  rows = [json.loads(line) for line in open(stats['files']['data'])]
  _check_run(stats, tasks, rows, seed_tasks)
  f = stats['instructions']['filtered']
  assert f['keyword'] >= 3 and f['too_short'] >= 3 and f['duplicate'] >= 3
  assert stats['instructions']['kept'] > 0 and stats['classification']['yes'] > 0
  assert stats['classification']['no'] > 0
  assert stats['instances']['filtered']['output_equals_input'] > 0
  assert stats['instances']['filtered']['duplicate'] > 0
  assert stats['instances']['filtered']['unparseable'] > 0
  for t in tasks:  # classification tasks got output-first instances
    want = ([{'input': 'Great film.', 'output': 'Positive'}] if t['is_classification']
            else [{'input': 'abc', 'output': 'cba'}])
    assert t['is_classification'] == ('sentiment' in t['instruction'])
    assert t['instances'] == want
  # Prompts: 8 instructions; 6 human + 2 machine once the pool has machine ones.
  human = {t['instruction'] for t in seed_tasks}
  round_prompts = [p for p in prompts_seen if p[0].startswith('Come up with a series')]
  for r, prompts in enumerate(round_prompts):
    for p in prompts:
      items = re.findall(r'^\d+\. (.*)$', p, re.M)
      assert len(items) == 8 and p.endswith('\n9.')
      assert sum(i in human for i in items) == (8 if r == 0 else 6)
  # The output reads as Alpaca data.
  from t5x_lite.data import instructions  # pylint: disable=g-import-not-at-top
  assert len(list(instructions.read_alpaca(stats['files']['data']))) == len(rows)
  # Deterministic given the seed.
  again = si.self_instruct(model=decoder.DecoderModel(decoder.GPTConfig()),
                           checkpoint_path=None, output_dir=str(tmp_path / 'b'),
                           seed_tasks=SEEDS, num_rounds=3, prompts_per_round=2,
                           generate=lambda ps: [_stub(p) for p in ps])
  assert open(again['files']['tasks']).read() == open(stats['files']['tasks']).read()


@pytest.mark.usefixtures('shared_seeds')
def test_an_interrupted_run_resumes_from_its_log(tmp_path):
  """Stopped in its second round, the same command replays the logged
  continuations, generates only the rest and writes what an uninterrupted run
  writes; other settings are one line."""
  calls = []

  def generate(prompts):
    calls.append(len(prompts))
    return [_stub(p) for p in prompts]

  def stops_at_the_fourth_call(prompts):
    if len(calls) == 3:
      raise KeyboardInterrupt
    return generate(prompts)

  run = lambda out, fn, **kw: si.self_instruct(
      model=decoder.DecoderModel(decoder.GPTConfig()), checkpoint_path=None,
      output_dir=str(tmp_path / out), seed_tasks=SEEDS, num_rounds=2, prompts_per_round=3,
      batch_size=2, generate=fn, **kw)
  whole = run('whole', generate)
  everything = list(calls)
  assert len(everything) > 3  # generate and classify calls, in batches of 2
  calls.clear()
  with pytest.raises(KeyboardInterrupt):
    run('cut', stops_at_the_fourth_call)
  calls.clear()
  again = run('cut', generate)
  assert sum(calls) < sum(everything) and again['resumed'] > 0
  for name in ('data', 'tasks'):
    assert open(again['files'][name]).read() == open(whole['files'][name]).read()
  assert again['instructions'] == whole['instructions']
  with pytest.raises(UserError, match='differing: seed'):
    run('cut', generate, seed=1)


@pytest.mark.usefixtures('shared_seeds')
def test_random_init_gpt_end_to_end(tmp_path, capsys):
  cfg = decoder.GPTConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_layers=1, max_positions=320)
  model = decoder.DecoderModel(cfg)
  stats = si.self_instruct(model=model, checkpoint_path=None, output_dir=str(tmp_path),
                           seed_tasks=SEEDS, num_rounds=2, prompts_per_round=4, batch_size=4,
                           prompt_length=256, max_decode_length=48, temperature=1.0, top_p=0.9)
  out = capsys.readouterr().out
  assert 'random-init' in out and 'self_instruct: 2 rounds' in out
  tasks = [json.loads(line) for line in open(stats['files']['tasks'])]
  rows = [json.loads(line) for line in open(stats['files']['data'])]
  assert all(set(r) == {'instruction', 'input', 'output'} for r in rows)
  assert stats['prompts'] == 8 and stats['instructions']['generated'] >= 8
  _check_run(stats, tasks, rows, si.load_seed_tasks(SEEDS))
  assert json.load(open(stats['files']['stats']))['instructions'] == stats['instructions']
  with pytest.raises(UserError, match='max_positions'):
    si.self_instruct(model=model, checkpoint_path=None, output_dir=str(tmp_path),
                     seed_tasks=SEEDS, prompt_length=300, max_decode_length=48)


def test_bad_seed_file(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    si.load_seed_tasks(str(tmp_path / 'missing.jsonl'))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"instruction": "x"}\n')
  with pytest.raises(UserError, match='bad.jsonl:1'):
    si.load_seed_tasks(str(bad))


@pytest.mark.parametrize('path', ['gin/gpt_tiny_self_instruct.gin',
                                  'gin/gpt_self_instruct_base.gin'])
def test_gin_files_build(path):
  import gin  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse_gin([os.path.join(REPO, path)], [])
    model = gin.query_parameter('self_instruct.self_instruct.model').scoped_configurable_fn()
    length = (gin.query_parameter('PROMPT_LENGTH/gin.macro.value')
              + gin.query_parameter('MAX_DECODE_LENGTH/gin.macro.value') - 1)
    assert length <= model.config.max_positions
    assert model.config.vocab_size >= 8100  # the embedded BPE vocabulary
    assert gin.query_parameter('CHECKPOINT_PATH/gin.macro.value')
  finally:
    gin.clear_config()
