"""Evol-Instruct: the paper's prompts, the eliminator's rules, the rounds and
their stats against a scripted generator, resuming, and the command end to end
on a tiny trained checkpoint whose output trains an instruction task."""

import json
import os
import random
import re

import pytest

import conftest
from conftest import main_in_process
from t5x_lite import evol_instruct as ei
from t5x_lite.errors import UserError

DEPTH_HEAD = (
    'I want you act as a Prompt Rewriter.\n'
    'Your objective is to rewrite a given prompt into a more complex version to make those '
    'famous AI systems (e.g., ChatGPT and GPT4) a bit harder to handle.\n'
    'But the rewritten prompt must be reasonable and must be understood and responded by '
    'humans.\n'
    'Your rewriting cannot omit the non-text parts such as the table and code in '
    '#Given Prompt#:. Also, please do not omit the input in #Given Prompt#.\n'
    'You SHOULD complicate the given prompt using the following method:\n')
DEPTH_TAIL = (
    'You should try your best not to make the #Rewritten Prompt# become verbose, '
    '#Rewritten Prompt# can only add 10 to 20 words into #Given Prompt#.\n'
    "'#Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not "
    'allowed to appear in #Rewritten Prompt#\n'
    '#Given Prompt#:\nSort the numbers.\n3 1 2\n'
    '#Rewritten Prompt#:\n')
METHODS = {
    'constraints': 'Please add one more constraints/requirements into #Given Prompt#',
    'deepening': 'If #Given Prompt# contains inquiries about certain issues, the depth and '
                 'breadth of the inquiry can be increased.',
    'concretizing': 'Please replace general concepts with more specific concepts.',
    'reasoning': 'If #Given Prompt# can be solved with just a few simple thinking processes, '
                 'you can rewrite it to explicitly request multiple-step reasoning.',
}
BREADTH = (
    'I want you act as a Prompt Creator.\n'
    'Your goal is to draw inspiration from the #Given Prompt# to create a brand new prompt.\n'
    'This new prompt should belong to the same domain as the #Given Prompt# but be even more '
    'rare.\n'
    'The LENGTH and difficulty level of the #Created Prompt# should be similar to that of the '
    '#Given Prompt#.\n'
    'The #Created Prompt# must be reasonable and must be understood and responded by humans.\n'
    "'#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are not allowed "
    'to appear in #Created Prompt#\n'
    '#Given Prompt#:\nSort the numbers.\n3 1 2\n'
    '#Created Prompt#:\n')


@pytest.mark.parametrize('operation', list(METHODS) + ['breadth'])
def test_evolution_prompts(operation):
  got = ei.evolution_prompt(operation, '  Sort the numbers.\n3 1 2 ')
  want = BREADTH if operation == 'breadth' else DEPTH_HEAD + METHODS[operation] + '\n' + DEPTH_TAIL
  assert got == want
  assert ei.model_prompt(got, 'raw') == got
  assert ei.model_prompt(got, 'instruction') == (
      f'### Instruction:\n{got.strip()}\n\n### Response:\n')


def _lcs_precision(reference, candidate):
  """LCS of lowercase alphanumeric words / candidate words, by dynamic programming."""
  x, y = re.findall(r'[a-z0-9]+', reference.lower()), re.findall(r'[a-z0-9]+', candidate.lower())
  t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
  for i, u in enumerate(x):
    for j, v in enumerate(y):
      t[i + 1][j + 1] = t[i][j] + 1 if u == v else max(t[i][j + 1], t[i + 1][j])
  return t[-1][-1] / len(y) if y else 0.0


SOURCE = 'Describe the main causes of the French Revolution in a short paragraph.'  # 12 words


@pytest.mark.parametrize('evolved, precision, reason', [
    ('', None, 'empty'),
    (' ### \n', None, 'empty'),
    ('#Rewritten Prompt#: Describe the causes of the French Revolution in 200 words.', None,
     'copied_prompt'),
    ('Explain, as the given  prompt asks, why the Bastille fell.', None, 'copied_prompt'),
    ('Created Prompt - name three painters of the Baroque.', None, 'copied_prompt'),
    ('describe the main causes of the french revolution in a short paragraph', 1.0, 'no_gain'),
    ('Describe the main causes of the French Revolution.', 1.0, 'no_gain'),  # cut down
    ('Describe the three main causes of the French Revolution in a short paragraph.', 12 / 13,
     'no_gain'),
    ('Describe the main causes of the French Revolution in a short paragraph, citing two '
     'primary sources from 1789.', 12 / 18, None),  # a constraint: 6 new words
    ('Explain how the printing press changed religion in sixteenth-century Europe.', 2 / 11,
     None),  # in-breadth: a new prompt ('the ... in')
])
def test_instruction_rules(evolved, precision, reason):
  if precision is not None:
    assert _lcs_precision(SOURCE, evolved) == pytest.approx(precision)
  assert ei.instruction_reason(SOURCE, evolved) == reason


LONG = ' '.join(['Paris has many museums'] * 20)  # 80 words


@pytest.mark.parametrize('response, rule, reason', [
    ('', 'and', 'stopwords_only'),
    ('... !!! ?', 'and', 'stopwords_only'),
    ("It is what it is, and so on; you'll do.", 'and', 'stopwords_only'),
    ("I'm sorry, but I cannot answer that.", 'and', 'sorry'),
    ("I'm SORRY, but I cannot answer that.", 'or', 'sorry'),
    ('Sorry. ' + LONG, 'and', None),  # long enough: the paper keeps it
    ('Sorry. ' + LONG, 'or', 'sorry'),
    ('Paris is the capital of France.', 'and', None),
    ('Paris is the capital of France.', 'or', 'short'),
    (LONG, 'or', None),  # 80 words
    (LONG.rsplit(' ', 1)[0], 'or', 'short'),  # 79
    ('The sorrowful tale ends well.', 'and', None),  # whole words only
])
def test_response_rules(response, rule, reason):
  assert ei.response_reason(response, struggle_rule=rule) == reason


# ---- the rounds against a scripted generator ----

POOL = [('Write a poem about the sea.', ''),
        ('Copy this sentence.', 'The cat sat.'),
        ('Say the same thing again.', ''),
        ('Leave it blank.', ''),
        ('Ask something the model says sorry to.', ''),
        ('Ask something answered with stop words.', '')]
TAIL = ' Use exactly fourteen lines and rhyme every second line.'
ANSWER = ' '.join(['word'] * 90)


def _write_pool(path, rows=POOL):
  path.write_text(''.join(json.dumps({'instruction': i, 'input': x, 'output': 'o'}) + '\n'
                          for i, x in rows))
  return str(path)


def _source(prompt):
  return re.search(r'#Given Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n', prompt,
                   re.S).group(1)


class Scripted:
  """Fixed continuations by the instruction's keywords; records every prompt."""

  def __init__(self, fail_after=None):
    self.prompts, self.fail_after = [], fail_after

  def __call__(self, prompts):
    if self.fail_after is not None and len(self.prompts) >= self.fail_after:
      raise RuntimeError('interrupted')
    self.prompts.extend(prompts)
    return [self.one(p) for p in prompts]

  @staticmethod
  def one(prompt):
    if '#Given Prompt#:' in prompt:  # an evolution
      source = _source(prompt)
      if 'Copy' in source:
        return f'#Rewritten Prompt#: {source} now'
      if 'same' in source:
        return ' ' + source.upper() + '\n### Instruction:\nmore'
      if 'blank' in source:
        return '  '
      return source + TAIL
    instruction = prompt[len('### Instruction:\n'):].split('\n\n### Response:')[0]
    if 'sorry' in instruction:
      return "I'm sorry, I cannot."
    if 'stop words' in instruction:
      return 'It is, and it was.'
    return ANSWER + '\n### Instruction:\nnext'


def _run(tmp_path, generate, out='out', **kwargs):
  kwargs = {'num_rounds': 2, 'chunk_size': 4, 'seed': 5, **kwargs}
  return ei.evol_instruct(generate=generate, output_dir=str(tmp_path / out),
                          pool=_write_pool(tmp_path / 'pool.jsonl'), **kwargs)


def _read(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_rounds_with_scripted_generator(tmp_path, capsys):
  gen = Scripted()
  stats = _run(tmp_path, gen)
  # Operations: drawn per (seed, round, slot).
  ops = {(r, i): random.Random(f'5:{r}:{i}').choice(list(ei.OPERATIONS))
         for r in (1, 2) for i in range(6)}
  log = _read(stats['files']['log'])
  assert log[0]['settings']['seed'] == 5 and log[0]['settings']['generator'] is None
  records = log[1:]
  assert [(r['round'], r['index']) for r in records] == sorted(ops)
  assert all(r['operation'] == ops[r['round'], r['index']] for r in records)
  # Every evolution prompt is the paper's, in the instruction template.
  evolutions = [p for p in gen.prompts if '#Given Prompt#:' in p]
  assert evolutions == [ei.model_prompt(ei.evolution_prompt(r['operation'], r['source']),
                                        'instruction') for r in records]
  assert records[1]['source'] == 'Copy this sentence.\nThe cat sat.'  # the input goes along
  # One elimination of each kind per round: the poem is kept, and evolves again
  # from its evolution; the failed ones go back to the pool unchanged.
  reasons = {0: None, 1: 'copied_prompt', 2: 'no_gain', 3: 'empty', 4: 'sorry',
             5: 'stopwords_only'}
  for r in records:
    assert r['reason'] == reasons[r['index']]
    assert r['source'] == (POOL[0][0] + TAIL if (r['round'], r['index']) == (2, 0)
                           else ei.load_pool(str(tmp_path / 'pool.jsonl'))[1][r['index']])
  assert records[6]['instruction'] == POOL[0][0] + TAIL + TAIL
  assert records[6]['depth'] == 2
  assert records[0]['output'] == ANSWER  # cut at the next template block
  assert records[2]['instruction'] == 'SAY THE SAME THING AGAIN.'
  # Only instructions that pass are answered: 3 of 6 per round.
  assert len(gen.prompts) == 2 * (6 + 3)
  # Stats: one of each per round, by hand; the sums agree.
  for n, rnd in enumerate(stats['rounds'], 1):
    assert rnd['round'] == n and rnd['generated'] == 6 and rnd['kept'] == 1
    assert rnd['eliminated'] == {'empty': 1, 'copied_prompt': 1, 'no_gain': 1,
                                 'stopwords_only': 1, 'sorry': 1, 'short': 0}
    by_op = rnd['operations']
    assert sum(c['generated'] for c in by_op.values()) == 6
    for op, c in by_op.items():
      mine = [r for r in records if r['round'] == n and r['operation'] == op]
      assert c['generated'] == len(mine) == c['kept'] + sum(c['eliminated'].values())
      assert c['kept'] == sum(r['reason'] is None for r in mine)
    assert rnd['response_words'] == {'mean': 90, 'min': 90, 'max': 90}
  assert stats['rounds'][0]['instruction_words']['kept'] == {'mean': 15, 'min': 15, 'max': 15}
  assert stats['rounds'][1]['instruction_words']['kept']['mean'] == 24
  assert stats['rounds'][0]['pool_depth'] == {'mean': round(1 / 6, 3), 'max': 1,
                                              'counts': {'0': 5, '1': 1}}
  assert stats['rounds'][1]['pool_depth']['counts'] == {'0': 5, '2': 1}
  total = stats['total']
  assert total['generated'] == 12 and total['kept'] == 2 and total['eliminated']['sorry'] == 2
  assert sum(c['kept'] for c in total['operations'].values()) == 2
  assert stats['resumed'] == 0 and stats['rows'] == 2
  assert json.load(open(stats['files']['stats']))['total'] == total
  # The rows are Alpaca data.
  rows = _read(stats['files']['data'])
  assert rows == [{'instruction': POOL[0][0] + TAIL, 'input': '', 'output': ANSWER},
                  {'instruction': POOL[0][0] + TAIL + TAIL, 'input': '', 'output': ANSWER}]
  from t5x_lite.data import instructions  # pylint: disable=g-import-not-at-top
  assert len(list(instructions.read_alpaca(stats['files']['data']))) == 2
  assert 'evol_instruct: 2 rounds over 6 instructions, 12 evolutions (0 from the log), 2 kept' in (
      capsys.readouterr().out)


def test_rerun_resumes(tmp_path):
  whole = _run(tmp_path, Scripted(), out='whole')
  # Interrupted in round 1's second chunk (after the first chunk's 4 + 1 prompts).
  with pytest.raises(RuntimeError, match='interrupted'):
    _run(tmp_path, Scripted(fail_after=5))
  assert len(_read(tmp_path / 'out' / 'evol_instruct_log.jsonl')) == 1 + 4
  again = Scripted()
  stats = _run(tmp_path, again)
  assert stats['resumed'] == 4
  assert len([p for p in again.prompts if '#Given Prompt#' in p]) == 2 + 6  # the rest only
  for name in ('data', 'log'):
    assert open(stats['files'][name]).read() == open(whole['files'][name]).read()
  assert stats['total'] == whole['total'] and stats['rounds'] == whole['rounds']
  # The same command once more: nothing left to generate.
  idle = Scripted()
  assert _run(tmp_path, idle)['resumed'] == 12 and not idle.prompts
  # A third round continues from the log.
  more = Scripted()
  stats = _run(tmp_path, more, num_rounds=3)
  assert stats['resumed'] == 12 and len(more.prompts) == 6 + 3 and stats['rows'] == 3
  # Other settings are refused; RESUME=False starts over.
  with pytest.raises(UserError, match=r'other settings \(differing: seed\)'):
    _run(tmp_path, Scripted(), seed=6)
  assert _run(tmp_path, Scripted(), seed=6, resume=False)['resumed'] == 0


def test_pool_files_and_bad_settings(tmp_path):
  seeds = conftest.require_shared_data('instructions', 'self_instruct', 'seed_tasks.jsonl')
  path, pool = ei.load_pool(seeds, 3)
  first = [json.loads(line) for line in open(seeds)][:3]
  assert path == seeds and len(pool) == 3
  for text, task in zip(pool, first):
    inp = task['instances'][0]['input'].strip()
    assert text == task['instruction'].strip() + (f'\n{inp}' if inp else '')
  alpaca = conftest.require_shared_data('instructions', 'alpaca', 'alpaca_en_demo.json')
  rows = json.load(open(alpaca))
  _, pool = ei.load_pool(alpaca)
  assert len(pool) == len(rows) == 999
  assert pool[5] == (rows[5]['instruction'].strip()
                     + (f"\n{rows[5]['input'].strip()}" if rows[5]['input'].strip() else ''))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"instruction": "ok"}\n{"prompt": "no instruction"}\n')
  with pytest.raises(UserError, match='bad.jsonl line 2 needs a non-empty string'):
    ei.load_pool(str(bad))
  with pytest.raises(UserError, match='does not exist'):
    ei.load_pool(str(tmp_path / 'missing.jsonl'))
  cases = [({'operations': ['constraints', 'widen']}, r"fix the names \['widen'\]"),
           ({'prompt_format': 'chat'}, "PROMPT_FORMAT='chat' is unknown"),
           ({'struggle_rule': 'xor'}, "STRUGGLE_RULE='xor' is unknown"),
           ({'num_rounds': 0}, 'must be at least 1'),
           ({'no_gain_precision': 0}, r'must lie in \(0, 1\]')]
  for kwargs, match in cases:
    with pytest.raises(UserError, match=match):
      _run(tmp_path, Scripted(), **kwargs)


# ---- the command on a tiny trained checkpoint ----

TINY_GPT = [f'--gin.decoder.GPTConfig.{k}={v}' for k, v in (
    ('emb_dim', 16), ('num_heads', 2), ('head_dim', 8), ('mlp_dim', 32), ('num_layers', 1),
    ('max_positions', 320))]


def _train_instruct(model_dir, task, steps):
  """gin/gpt_instruct_wit.gin on `task` for `steps` steps, at the tiny size."""
  from t5x_lite import train as train_lib  # pylint: disable=g-import-not-at-top
  main_in_process(train_lib, [
      '--gin_file=gin/gpt_instruct_wit.gin', *TINY_GPT, f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.MIXTURE_OR_TASK_NAME='{task}'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, "
      "'targets': 32}", f'--gin.TRAIN_STEPS={steps}', f'--gin.CHECKPOINT_PERIOD={steps}',
      '--gin.EVAL_PERIOD=0', '--gin.WARMUP_STEPS=1', '--gin.BATCH_SIZE=2',
      '--gin.train_script.train.progress_bar=False'])
  return conftest.read_metrics(model_dir)


def test_command_end_to_end_and_training_on_its_output(tmp_path, capsys):
  from t5x_lite import evol_instruct as module  # pylint: disable=g-import-not-at-top
  from t5x_lite.tasks import instructions  # pylint: disable=g-import-not-at-top
  pool = _write_pool(tmp_path / 'pool.jsonl')
  instructions.register_instruction_task('evol_test_seed_gpt', pool)
  _train_instruct(tmp_path / 'seed_model', 'evol_test_seed_gpt', 1)
  argv = ['--gin_file=gin/gpt_tiny_evol_instruct.gin', *TINY_GPT,
          f"--gin.CHECKPOINT_PATH='{tmp_path / 'seed_model' / 'checkpoints' / '1'}'",
          f"--gin.OUTPUT_DIR='{tmp_path / 'evol'}'", f"--gin.POOL='{pool}'", '--gin.POOL_SIZE=4',
          '--gin.NUM_ROUNDS=1', '--gin.BATCH_SIZE=4', '--gin.PROMPT_LENGTH=256',
          '--gin.MAX_DECODE_LENGTH=48', '--gin.TEMPERATURE=1.0', '--gin.TOP_P=1.0']
  main_in_process(module, argv)
  assert 'evol_instruct: 1 rounds over 4 instructions, 4 evolutions' in capsys.readouterr().out
  stats = json.load(open(tmp_path / 'evol' / 'evol_instruct_stats.json'))
  total = stats['total']
  assert total['generated'] == 4 == total['kept'] + sum(total['eliminated'].values())
  gen = stats['generation']
  assert gen['prompts'] == 4 + total['kept'] + total['eliminated']['stopwords_only'] + (
      total['eliminated']['sorry'])  # every evolution, then the answered ones
  assert gen['tokens'] > 0 and gen['tokens_per_second'] > 0 and gen['compile_seconds'] > 0
  settings = _read(tmp_path / 'evol' / 'evol_instruct_log.jsonl')[0]['settings']
  assert settings['generator']['checkpoint_path'].endswith('checkpoints/1')
  assert settings['generator']['max_decode_length'] == 48
  rows = _read(tmp_path / 'evol' / 'evol_instruct.jsonl')
  assert len(rows) == stats['rows'] == total['kept'] > 0
  # The same command again finds everything done.
  main_in_process(module, argv)
  assert '4 evolutions (4 from the log)' in capsys.readouterr().out
  # The output trains an instruction task.
  instructions.register_instruction_task('evol_test_out_gpt',
                                         str(tmp_path / 'evol' / 'evol_instruct.jsonl'))
  metrics = _train_instruct(tmp_path / 'evol_model', 'evol_test_out_gpt', 2)
  losses = [m['loss'] for m in metrics if 'loss' in m]
  assert len(losses) == 2 and all(0 < x < 20 for x in losses)
  assert os.path.isdir(tmp_path / 'evol_model' / 'checkpoints' / '2')


def test_gin_files_build():
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse_gin([os.path.join(conftest.REPO, 'gin/gpt_tiny_evol_instruct.gin')], [])
    model = gin.query_parameter('generation.model_generator.model').scoped_configurable_fn()
    length = (gin.query_parameter('PROMPT_LENGTH/gin.macro.value')
              + gin.query_parameter('MAX_DECODE_LENGTH/gin.macro.value') - 1)
    assert length <= model.config.max_positions
    assert model.config.vocab_size >= 8100  # the embedded BPE vocabulary
    assert tuple(gin.query_parameter('OPERATIONS/gin.macro.value')) == ei.OPERATIONS
    assert gin.query_parameter('CHECKPOINT_PATH/gin.macro.value')
  finally:
    gin.clear_config()
