"""Instruction back-translation: the backward task, segments, rating parses,
curation against scripted generators, and a tiny checkpoint end to end."""

import json
import os

import gin
import pytest
import seqio

import conftest
from conftest import main_in_process, read_metrics
from t5x_lite import back_translate as bt
from t5x_lite.data import back_translation as btd
from t5x_lite.data import instructions
from t5x_lite.errors import UserError
from t5x_lite.models import decoder
from t5x_lite.tasks import back_translation
from t5x_lite.tasks import instructions as ti

HEAD = ('### Instruction:\nWrite the instruction that the following text is a response to.'
        '\n\n### Input:\n')
TAIL = '\n\n### Response:\n'


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


# ----------------------------------------------------------------------------
# Step 1: the backward task.


@pytest.mark.parametrize('gpt', [False, True])
def test_backward_task_swaps_fields(tmp_path, gpt):
  sfx = '_gpt' if gpt else ''
  path = _write(tmp_path / 'seed.jsonl', [
      {'instruction': 'Name a primary colour.', 'input': '', 'output': ' Red. '},
      {'instruction': ' Add the numbers. ', 'input': '2 3\n', 'output': '5'}])
  ti.register_instruction_task('bt_seed' + sfx, path, 'alpaca', system_prompt='Be brief.')
  task = back_translation.register_backward_task('bt_seed_backward' + sfx, 'bt_seed' + sfx)
  assert back_translation.backward_name('bt_seed' + sfx) == 'bt_seed_backward' + sfx
  rows = list(task.get_dataset({'inputs': 64, 'targets': 32}, split='train', shuffle=False)
              .as_numpy_iterator())
  want = [(HEAD + 'Red.' + TAIL, 'Name a primary colour.'),
          (HEAD + '5' + TAIL, 'Add the numbers.\n\n### Input:\n2 3')]
  assert [(r['inputs_pretokenized'].decode(), r['targets_pretokenized'].decode())
          for r in rows] == want
  vocab = task.output_features['targets'].vocabulary
  eos = [] if gpt else [1]
  for row, (prompt, block) in zip(rows, want):
    assert row['inputs'].tolist() == vocab.encode(prompt) + eos
    assert row['targets'].tolist() == vocab.encode(block) + [1]
    assert [r.decode() for r in row['references']] == [block]
  # The generator's prompt and its parse agree with the task.
  assert btd.backward_prompt(' Red. ') == want[0][0]
  assert btd.instruction_block(' Add the numbers. ', '2 3\n') == want[1][1]
  assert btd.parse_instruction_block(want[1][1] + TAIL + 'junk') == ('Add the numbers.', '2 3')


def test_built_in_backward_tasks_and_errors():
  for name, source in (('alpaca_demo_backward', 'alpaca_demo'),
                       ('alpaca_demo_backward_gpt', 'alpaca_demo_gpt')):
    task, src = seqio.get_mixture_or_task(name), seqio.get_mixture_or_task(source)
    assert task.source is src.source and task.output_features == src.output_features
  with pytest.raises(UserError, match='No task named'):
    back_translation.register_backward_task('x_backward', 'no_such_task')
  with pytest.raises(UserError, match='no inputs / targets'):
    back_translation.register_backward_task('x_backward', 'embedded_lm')


# ----------------------------------------------------------------------------
# Step 2: segments and instructions.


def test_segments_from_jsonl_text_and_wikitext(tmp_path):
  para = 'A first paragraph that is long enough.'
  jsonl = _write(tmp_path / 'docs.jsonl', [
      {'text': f'{para}\nShort.\nA second paragraph, also long enough.'},
      {'text': f'{para}\nShort.'},  # a duplicate
      {'text': 'Tiny.'},
      {'text': 'One sentence here. ' + 'x' * 70 + '. Another sentence.'}])
  files, fmt = btd.resolve_text(jsonl)
  assert fmt == 'jsonl'
  segments, stats = btd.read_segments(files, fmt, num_segments=10, min_chars=15, max_chars=60)
  assert segments == [para + '\nShort.', 'A second paragraph, also long enough.',
                      'One sentence here.', 'Another sentence.']
  assert stats == {'documents': 4, 'read': 7, 'used': 4,
                   'filtered': {'too_short': 1, 'too_long': 1, 'duplicate': 1}}
  first, stats = btd.read_segments(files, fmt, num_segments=2, min_chars=15, max_chars=60)
  assert first == segments[:2] and stats['read'] == 2
  wiki = tmp_path / 'wiki.txt'
  wiki.write_text(' \n = Lobster = \n \n It weighs 0 @.@ 7 kg ( 2 lb ) , or more . \n'
                  ' = = Range = = \n It lives in the sea @-@ bed . \n')
  files, fmt = btd.resolve_text(str(wiki), 'wikitext')
  assert btd.read_segments(files, fmt, num_segments=9, min_chars=1, max_chars=99)[0] == [
      'It weighs 0.7 kg (2 lb), or more.', 'It lives in the sea-bed.']
  text = tmp_path / 'lines.txt'
  text.write_text('first document\n\nsecond document\n')
  files, fmt = btd.resolve_text(str(text))
  assert btd.read_segments(files, fmt, num_segments=9, min_chars=1, max_chars=99)[0] == [
      'first document', 'second document']
  with pytest.raises(UserError, match='No text file'):
    btd.resolve_text(str(tmp_path / 'none.txt'))
  with pytest.raises(UserError, match=r'docs\.jsonl:1.*TEXT_KEY'):
    btd.read_segments(*btd.resolve_text(jsonl), num_segments=1, min_chars=1, max_chars=9,
                     text_key='body')


@pytest.mark.parametrize('text, want', [
    ('Give three tips for sleep.', ('Give three tips for sleep.', '')),
    (' Sort these.\n\n### Input:\n3 1 2\n\n### Response:\n1 2 3', ('Sort these.', '3 1 2')),
    ('Summarise.### Instruction: again', ('Summarise.', '')),
    ('\n### Response:\nonly a response', ('', '')),
    ('', ('', '')),
])
def test_parse_instruction_block(text, want):
  assert btd.parse_instruction_block(text) == want


# ----------------------------------------------------------------------------
# Step 3: ratings.


@pytest.mark.parametrize('text, score', [
    ('The answer is clear and complete.\nScore: 4', 4.0),
    ('I would rate this 5 out of 5.', 5.0),
    ('4/5', 4.0),
    ('Score: 4.5', 4.5),
    ('score:5', 5.0),
    ('The score is **3**.', 3.0),
    ('Reasoning: it lists 2 of 7 steps.\nScore: 2', 2.0),
    ('Score: 2\nOn reflection, Score: 5', 5.0),  # the last line counts
    ('Score: four', 4.0),
    ('Rating: 3', 3.0),
    ('I rate it a 1.', 1.0),
    ('Score: 4/5', 4.0),
    ('', None),
    ('The answer is helpful.', None),
    ('Score: <rating>', None),
    ('Score: 9', None),  # off the scale
    ('Score: 0', None),
    ('It has 3 paragraphs.', None),
    ('7/5', None),
])
def test_parse_rating(text, score):
  assert btd.parse_rating(text) == score


def test_rating_prompt_is_the_papers():
  prompt = btd.rating_prompt('Sort these.', '3 1 2', ' 1 2 3 ')
  assert prompt.startswith('### Instruction:\nBelow is an instruction from an user and a '
                           'candidate answer.')
  assert prompt.endswith('write "Score: <rating>" in the last line.\n\n### Input:\n'
                         'Instruction: Sort these.\nInput: 3 1 2\n\nAnswer: 1 2 3'
                         '\n\n### Response:\n')
  assert all(f'\n{n}: It means' in btd.RATING_PROMPT for n in range(1, 6))


# Scripted models: the instruction a segment gets and the rating each
# instruction gets.
RATINGS = {'Describe A.': 'Clear.\nScore: 5', 'Describe B.': 'I would rate this 5 out of 5',
           'Describe C.': '4/5', 'Describe D.': 'Score: 4.5', 'Describe E.': 'No idea.',
           'Describe F.': 'Score: 3'}


def _fake_generate(prompts):
  out = []
  for p in prompts:
    letter = p[len(HEAD)]
    out.append('#####\n' if letter == 'G' else f'Describe {letter}.'
               + ('\n\n### Input:\ncontext' if letter == 'A' else '') + TAIL + 'more')
  return out


def _fake_rate(prompts):
  return [RATINGS[p.split('Instruction: ', 1)[1].split('\n', 1)[0]] for p in prompts]


def test_curation_threshold_and_stats_with_scripted_models(tmp_path):
  text = _write(tmp_path / 'text.jsonl',
                [{'text': f'{c} is the segment about {c}.'} for c in 'ABCDEFG'])
  calls = []

  def rate(prompts):
    calls.append(len(prompts))
    return _fake_rate(prompts)

  model = decoder.DecoderModel(decoder.GPTConfig())
  run = lambda out, **kw: bt.back_translate(
      model=model, backward_checkpoint_path=None, curation_checkpoint_path=None,
      output_dir=str(tmp_path / out), text=text, min_segment_chars=5, generate=_fake_generate,
      rate=rate, **kw)
  stats = run('a')
  assert stats['segments']['used'] == stats['segments']['read'] == 7
  assert stats['instructions'] == {'generated': 7, 'empty': 1, 'candidates': 6}
  assert calls == [6]  # one call; the empty instruction is never rated
  ratings = stats['ratings']
  assert ratings['parsed'] == 5 and ratings['unparseable'] == 1
  assert ratings['scores'] == {'3': 1, '4': 1, '4.5': 1, '5': 2}
  assert ratings['parsed'] + ratings['unparseable'] == stats['instructions']['candidates']
  assert sum(ratings['scores'].values()) == ratings['parsed']
  assert stats['kept'] == ratings['kept'] == 3 and ratings['threshold'] == 4.5
  rows = [json.loads(l) for l in open(stats['files']['data'])]
  assert rows == [
      {'instruction': 'Describe A.', 'input': 'context', 'output': 'A is the segment about A.'},
      {'instruction': 'Describe B.', 'input': '', 'output': 'B is the segment about B.'},
      {'instruction': 'Describe D.', 'input': '', 'output': 'D is the segment about D.'}]
  cands = [json.loads(l) for l in open(stats['files']['candidates'])]
  assert [(c['instruction'], c['rating'], c['score'], c['kept']) for c in cands] == [
      (f'Describe {c}.', RATINGS[f'Describe {c}.'], s, k) for c, s, k in
      zip('ABCDEF', (5.0, 5.0, 4.0, 4.5, None, 3.0), (1, 1, 0, 1, 0, 0))]
  gen = stats['generation']
  assert gen['augment']['prompts'] == 7 and gen['curate']['prompts'] == 6
  assert gen['curate']['tokens'] > 0 and gen['augment']['tokens'] > 0
  assert json.load(open(stats['files']['stats']))['ratings'] == ratings
  # The output is Alpaca data; its prompts are what the curation model rated.
  read = list(instructions.read_alpaca(stats['files']['data']))
  assert read[0]['prompt'] == instructions.render_prompt('Describe A.', 'context')
  # A lower threshold keeps the 4; re-rating an earlier run's candidates reads no text.
  again = run('b', threshold=4.0, candidates_path=stats['files']['candidates'])
  assert again['kept'] == 4 and again['segments'] is None
  assert again['instructions']['candidates'] == 6 and again['generation']['augment'] is None
  with pytest.raises(UserError, match='THRESHOLD'):
    run('c', threshold=7)
  with pytest.raises(UserError, match='CANDIDATES'):
    run('c', candidates_path=str(tmp_path / 'missing.jsonl'))


def test_an_interrupted_run_resumes_from_its_log(tmp_path):
  """Stopped during curation, the same command generates only the ratings it
  lacks and writes what an uninterrupted run writes; another THRESHOLD
  generates nothing; other settings are one line."""
  text = _write(tmp_path / 'text.jsonl',
                [{'text': f'{c} is the segment about {c}.'} for c in 'ABCDEFG'])
  generated, rated = [], []

  def generate(prompts):
    generated.append(len(prompts))
    return _fake_generate(prompts)

  def rate(prompts):
    rated.append(len(prompts))
    return _fake_rate(prompts)

  model = decoder.DecoderModel(decoder.GPTConfig())
  run = lambda out, **kw: bt.back_translate(
      model=model, backward_checkpoint_path=None, curation_checkpoint_path=None,
      output_dir=str(tmp_path / out), text=text, min_segment_chars=5, generate=generate,
      rate=rate, batch_size=4, **kw)
  whole = run('whole')
  assert generated == [4, 3] and rated == [4, 2] and whole['resumed'] == 0
  generated.clear()
  rated.clear()
  calls = {'n': 0}

  def rate_then_stop(prompts):  # the first rating batch finishes, the second stops the run
    calls['n'] += 1
    if calls['n'] == 2:
      raise KeyboardInterrupt
    return _fake_rate(prompts)

  with pytest.raises(KeyboardInterrupt):
    bt.back_translate(model=model, backward_checkpoint_path=None, curation_checkpoint_path=None,
                      output_dir=str(tmp_path / 'cut'), text=text, min_segment_chars=5,
                      generate=generate, rate=rate_then_stop, batch_size=4)
  generated.clear()
  again = run('cut')
  assert generated == [] and rated == [2] and again['resumed'] == 7 + 4
  for name in ('data', 'candidates'):
    assert open(again['files'][name]).read() == open(whole['files'][name]).read()
  rated.clear()
  lower = run('cut', threshold=4.0)
  assert generated == [] and rated == [] and lower['kept'] == whole['kept'] + 1
  with pytest.raises(UserError, match='seed'):
    run('cut', seed=1)


def test_metered_counts_from_a_model_generators_usage():
  usage = {'tokens': 10, 'seconds': 1.0, 'compile_seconds': 5.0, 'truncated_prompts': 0}

  def generate(prompts):
    usage.update(tokens=usage['tokens'] + 3 * len(prompts), seconds=usage['seconds'] + 0.5,
                 truncated_prompts=usage['truncated_prompts'] + 1)
    return ['x'] * len(prompts)

  metered = bt.Metered(generate, lambda text: 100, lambda: dict(usage))
  metered(['a', 'b'])
  metered(['c'])
  stats = metered.stats()
  assert (stats['prompts'], stats['tokens'], stats['seconds'], stats['compile_seconds'],
          stats['truncated_prompts'], stats['tokens_per_second']) == (3, 9, 1.0, 0, 2, 9.0)
  counted = bt.Metered(lambda ps: ['one two', 'three'][:len(ps)], lambda t: len(t.split()))
  counted(['p', 'q'])
  assert counted.stats()['tokens'] == 3 and counted.stats()['prompts'] == 2


# ----------------------------------------------------------------------------
# A tiny checkpoint end to end, and the output trains.

TINY = [
    '--gin.decoder.GPTConfig.emb_dim=32',
    '--gin.decoder.GPTConfig.num_heads=2',
    '--gin.decoder.GPTConfig.head_dim=16',
    '--gin.decoder.GPTConfig.mlp_dim=64',
    '--gin.decoder.GPTConfig.num_layers=1',
]


@pytest.mark.slow
def test_tiny_checkpoint_end_to_end_and_the_output_trains(tmp_path, capsys):
  conftest.require_shared_data('instructions', 'alpaca', 'alpaca_en_demo.json')
  conftest.require_shared_data('text', 'c4')
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  # Step 4's data: seed + curated pairs (here a scripted run's) train the tiny instruct gin.
  text = _write(tmp_path / 'text.jsonl', [{'text': f'{c} is the segment about {c}.'}
                                          for c in 'ABCD'])
  scripted = bt.back_translate(
      model=decoder.DecoderModel(decoder.GPTConfig()), backward_checkpoint_path=None,
      curation_checkpoint_path=None, output_dir=str(tmp_path / 'scripted'), text=text,
      min_segment_chars=5, generate=_fake_generate, rate=_fake_rate)
  mixture = back_translation.register_iteration_mixture('bt_test_m1_gpt',
                                                        scripted['files']['data'])
  curated = seqio.get_mixture_or_task('bt_test_m1_curated_gpt')
  assert [t.name for t in mixture.tasks] == ['alpaca_demo_gpt', 'bt_test_m1_curated_gpt']
  assert curated.num_input_examples('train') == scripted['kept'] == 3
  model_dir = str(tmp_path / 'm1')
  main_in_process(train, [
      '--gin_file=gin/gpt_instruct_wit.gin', *TINY, f"--gin.MODEL_DIR='{model_dir}'",
      "--gin.MIXTURE_OR_TASK_NAME='bt_test_m1_gpt'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", '--gin.BATCH_SIZE=4',
      '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_PERIOD=2', '--gin.EVAL_PERIOD=0',
      '--gin.train_script.train.log_every=1', '--gin.train_script.train.progress_bar=False'])
  assert [r['step'] for r in read_metrics(model_dir)] == [1, 2]
  # Steps 2 and 3 with that checkpoint as both models: a few C4 segments.
  ckpt = os.path.join(model_dir, 'checkpoints', '2')
  out = str(tmp_path / 'bt')
  main_in_process(bt, [
      '--gin_file=gin/gpt_tiny_back_translate.gin', *TINY,
      f"--gin.BACKWARD_CHECKPOINT_PATH='{ckpt}'", f"--gin.CURATION_CHECKPOINT_PATH='{ckpt}'",
      f"--gin.OUTPUT_DIR='{out}'", '--gin.NUM_SEGMENTS=4', '--gin.BATCH_SIZE=4',
      '--gin.MAX_SEGMENT_CHARS=300', '--gin.PROMPT_LENGTH=160', '--gin.MAX_DECODE_LENGTH=16',
      '--gin.RATING_DECODE_LENGTH=16'])
  assert 'back_translate: 4 segments' in capsys.readouterr().out
  stats = json.load(open(os.path.join(out, 'back_translation_stats.json')))
  seg, ins, rat = stats['segments'], stats['instructions'], stats['ratings']
  assert seg['used'] == 4 and seg['read'] == seg['used'] + sum(seg['filtered'].values())
  assert ins['generated'] == 4 and ins['candidates'] == ins['generated'] - ins['empty']
  assert rat['parsed'] + rat['unparseable'] == ins['candidates']
  assert sum(rat['scores'].values()) == rat['parsed']
  assert stats['kept'] <= ins['candidates'] // 2  # a two-step model's ratings mostly fail
  gen = stats['generation']
  assert gen['augment']['prompts'] == 4 and gen['curate']['prompts'] == ins['candidates']
  assert 0 <= gen['augment']['tokens'] <= 4 * 16 and gen['augment']['compile_seconds'] > 0
  assert gen['augment']['tokens_per_second'] is not None
  # Table 19's rubric alone outgrows a 160-token prompt: every rating prompt keeps its end.
  assert gen['curate']['truncated_prompts'] == ins['candidates']
  rows = [json.loads(l) for l in open(os.path.join(out, 'back_translation.jsonl'))]
  assert len(rows) == stats['kept']
  cands = [json.loads(l) for l in open(os.path.join(out, 'back_translation_candidates.jsonl'))]
  assert len(cands) == ins['candidates']
  assert all(c['score'] is None or 1 <= c['score'] <= 5 for c in cands)


@pytest.mark.parametrize('path', ['gin/gpt_tiny_back_translate.gin'])
def test_gin_file_builds(path):
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse_gin([os.path.join(conftest.REPO, path)], [])
    model = gin.query_parameter('back_translate.back_translate.model').scoped_configurable_fn()
    q = lambda name: gin.query_parameter(f'{name}/gin.macro.value')
    longest = q('PROMPT_LENGTH') + max(q('MAX_DECODE_LENGTH'), q('RATING_DECODE_LENGTH')) - 1
    assert longest <= model.config.max_positions
    assert q('THRESHOLD') == btd.SCORE_THRESHOLD == 4.5
    assert q('BACKWARD_CHECKPOINT_PATH') and q('CURATION_CHECKPOINT_PATH')
  finally:
    gin.clear_config()
