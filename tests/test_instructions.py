"""Instruction data, Flan-style GLUE instructions, mixtures and the WIT loss."""

import json
import math
import os

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from rouge_score import rouge_scorer

import families
from conftest import SHARED_DATA, require_shared_data
from t5x_lite.tasks import instructions as ti
from t5x_lite import metrics
from t5x_lite import runs
from t5x_lite import train as train_lib
from t5x_lite.data import feature_converters as fc
from t5x_lite.data import glue_sources
from t5x_lite.data import instructions
from t5x_lite.data import registry
from t5x_lite.data import settings
from t5x_lite.errors import UserError
from t5x_lite.models import decoder

DATA = os.path.join(SHARED_DATA, 'instructions')
SNI = os.path.join(DATA, 'super_natural_instructions', 'tasks')
SNI_137 = os.path.join(SNI, 'task137_detoxifying-lms_classification_toxicity.json')


@pytest.fixture
def shared_instructions():
  """The shared instruction samples (the built-in instruction tasks read them too)."""
  return require_shared_data('instructions')


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return str(path)


# ----------------------------------------------------------------------------
# Readers and templates.


def test_template_is_documented_alpaca_form():
  assert instructions.render_prompt('Add.', '2 + 2') == (
      '### Instruction:\nAdd.\n\n### Input:\n2 + 2\n\n### Response:\n')
  assert instructions.render_prompt(' Add. ', '  ', system='Be brief.') == (
      'Be brief.\n\n### Instruction:\nAdd.\n\n### Response:\n')


@pytest.mark.usefixtures('shared_instructions')
def test_readers_on_the_shared_samples():
  with open(os.path.join(DATA, 'alpaca', 'alpaca_en_demo.json')) as f:
    raw = json.load(f)
  got = instructions.read_examples(os.path.join(DATA, 'alpaca', 'alpaca_en_demo.json'), 'alpaca')
  assert len(got) == len(raw)
  for r, e in zip(raw[:50], got):
    assert e['response'] == r['output'] and e['references'] == [r['output']]
    assert e['prompt'] == instructions.render_prompt(r['instruction'], r['input'])

  with open(SNI_137) as f:
    task = json.load(f)
  for k in (0, 2):
    got = instructions.read_examples(SNI_137, 'sni', num_positive_examples=k)
    assert len(got) == len(task['Instances'])
    inst, ex = task['Instances'][3], got[3]
    assert ex['response'] == inst['output'][0] and ex['references'] == inst['output']
    assert ex['prompt'].startswith('### Instruction:\nDefinition: ' + task['Definition'][0].strip())
    assert ex['prompt'].endswith(f"### Input:\n{inst['input'].strip()}\n\n### Response:\n")
    assert ex['prompt'].count('Positive Example') == k
    assert ('Now complete the following example-' in ex['prompt']) == (k > 0)
    if k:
      first = task['Positive Examples'][0]
      assert f"Input: {first['input'].strip()}\nOutput: {first['output'].strip()}" in ex['prompt']

  seeds = os.path.join(DATA, 'self_instruct', 'seed_tasks.jsonl')
  with open(seeds) as f:
    rows = [json.loads(line) for line in f]
  got = instructions.read_examples(seeds, 'self_instruct')
  assert len(got) == sum(len(r['instances']) for r in rows)
  assert got[0]['task'] == rows[0]['name']


def test_readers_on_hand_written_files(tmp_path):
  dolly = _write(tmp_path / 'dolly.jsonl', json.dumps(
      {'instruction': 'Summarise.', 'context': 'A long text.', 'response': 'Short.',
       'category': 'summarization'}) + '\n\n')
  [ex] = instructions.read_examples(dolly, 'dolly', system='You are helpful.')
  assert ex == {'prompt': 'You are helpful.\n\n### Instruction:\nSummarise.\n\n### Input:\n'
                          'A long text.\n\n### Response:\n',
                'response': 'Short.', 'task': 'summarization', 'references': ['Short.'],
                'system': 'You are helpful.'}

  chat = _write(tmp_path / 'chat.json', json.dumps([{'messages': [
      {'role': 'system', 'content': 'Be terse.'},
      {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'},
      {'role': 'user', 'content': 'Sum 1 2'}, {'role': 'assistant', 'content': '3'}]}]))
  [ex] = instructions.read_examples(chat, 'chat', system='Think.')
  assert ex['response'] == '3'
  assert ex['prompt'] == ('Think.\n\nBe terse.\n\n### Instruction:\nHi\n\n### Response:\nHello.'
                          '\n\n### Instruction:\nSum 1 2\n\n### Response:\n')

  alpaca = _write(tmp_path / 'a.jsonl', '{"instruction": "Say hi.", "output": "hi"}\n')
  [ex] = instructions.read_examples(alpaca, 'alpaca')
  assert '### Input' not in ex['prompt'] and ex['response'] == 'hi' and ex['system'] == ''
  own = _write(tmp_path / 'own.jsonl', '{"instruction": "Say hi.", "output": "hi", '
               '"system": "Be terse."}\n')
  [ex] = instructions.read_examples(own, 'alpaca', system='Think.')
  assert ex['prompt'] == 'Think.\n\nBe terse.\n\n### Instruction:\nSay hi.\n\n### Response:\n'
  assert ex['system'] == 'Think.\n\nBe terse.'


@pytest.mark.parametrize('name,format,text,line', [
    ('list.json', 'alpaca', '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]', 3),
    ('bad.jsonl', 'alpaca', '{"instruction": "a", "output": "b"}\n{"instruction": \n', 2),
    ('num.jsonl', 'alpaca', '{"instruction": "a", "output": 3}\n', 1),
    ('open.json', 'alpaca', '[{"instruction": "a", "output": "b"}', 1),
    ('chat.jsonl', 'chat', '{"messages": [{"role": "user", "content": "x"}]}\n', 1),
    ('role.jsonl', 'chat', '{"messages": [{"role": "bot", "content": "x"}]}\n', 1),
    ('sni.json', 'sni', '{"Definition": ["d"],\n "Instances": [\n {"id": "i0", "input": "x"}]}', 3),
])
def test_malformed_records_name_file_and_line(tmp_path, name, format, text, line):
  path = _write(tmp_path / name, text)
  with pytest.raises(UserError, match=f'{name}:{line}:'):
    instructions.read_examples(path, format)


def test_unknown_format_and_missing_file(tmp_path):
  with pytest.raises(UserError, match='format'):
    instructions.read_examples(str(tmp_path / 'x.json'), 'csv')
  with pytest.raises(UserError, match='No instruction file'):
    instructions.read_examples(str(tmp_path / 'nope.json'), 'alpaca')


# ----------------------------------------------------------------------------
# Tasks, mixtures, metrics.


def test_task_features_trim_and_eos(tmp_path):
  long_input = ' '.join(f'word{i}' for i in range(200))
  path = _write(tmp_path / 'a.jsonl', json.dumps(
      {'instruction': 'Copy.', 'input': long_input, 'output': 'done ' * 50}) + '\n')
  for name in ('trim_t5', 'trim_gpt'):
    task = ti.register_instruction_task(name, path, 'alpaca')
    ex = next(task.get_dataset({'inputs': 32, 'targets': 8}, split='train', shuffle=False)
              .as_numpy_iterator())
    vocab = task.output_features['inputs'].vocabulary
    prompt_ids = vocab.encode(ex['inputs_pretokenized'].decode())
    response_ids = vocab.encode(ex['targets_pretokenized'].decode())
    eos = [] if name.endswith('_gpt') else [1]
    assert ex['inputs'].tolist() == prompt_ids[-(32 - len(eos)):] + eos  # keeps the end
    assert ex['targets'].tolist() == response_ids[:7] + [1]


def test_mixture_rates_are_capped_example_counts(tmp_path):
  sizes = {'mix_a': 5, 'mix_b': 30, 'mix_c': 12}
  for name, n in sizes.items():
    rows = ''.join(json.dumps({'instruction': f'{name} {i}', 'output': 'x'}) + '\n'
                   for i in range(n))
    ti.register_instruction_task(name, _write(tmp_path / f'{name}.jsonl', rows), 'alpaca',
                                 num_validation=2)
  mixture = ti.register_instruction_mixture('mix_capped', list(sizes), cap=10)
  for task in mixture.tasks:
    assert mixture.get_rate(task) == min(sizes[task.name] - 2, 10)
  with pytest.raises(UserError):
    ti.register_instruction_mixture('mix_bad', list(sizes), cap=0)


@pytest.mark.usefixtures('shared_instructions')
def test_sni_heldout_split_and_references():
  train = seqio.get_mixture_or_task('sni_train_mixture')
  heldout = seqio.get_mixture_or_task('sni_heldout_mixture')
  train_names = {t.name for t in train.tasks}
  heldout_names = {t.name for t in heldout.tasks}
  assert train_names and heldout_names and not train_names & heldout_names
  assert len(train_names | heldout_names) == len(os.listdir(SNI))
  task = seqio.get_mixture_or_task('sni_task131')
  with open(os.path.join(SNI, 'task131_scan_long_text_generation_action_command_long.json')) as f:
    outputs = [i['output'] for i in json.load(f)['Instances']]
  assert task.num_input_examples('validation') == ti.SNI_NUM_VALIDATION
  assert task.num_input_examples('train') == len(outputs) - ti.SNI_NUM_VALIDATION
  examples = list(task.get_dataset(None, split='validation', shuffle=False).take(5)
                  .as_numpy_iterator())
  for ex, refs in zip(examples, outputs):
    assert ti.references_postprocessor(ex['targets_pretokenized'], ex, is_target=True) == refs
  mix = seqio.get_mixture_or_task('instruction_mixture')
  assert {'alpaca_demo', 'glue_sst2_instruct', 'super_glue_copa_instruct'} <= {
      t.name for t in mix.tasks} and train_names <= {t.name for t in mix.tasks}


def test_rouge_l_is_best_over_references():
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  targets = ['the cat sat on the mat', ['no match here', 'a cat sat']]
  predictions = ['the cat sat', 'cat sat down']
  want = np.mean([scorer.score(targets[0], predictions[0])['rougeL'].fmeasure,
                  scorer.score('a cat sat', predictions[1])['rougeL'].fmeasure])
  assert metrics.rouge_l(targets, predictions)['rougeL'] == pytest.approx(100 * want)
  # By hand: LCS('a b c', 'a b') = 2, P = 1, R = 2/3, F = 0.8; the second is exact.
  assert metrics.rouge_l(['a b c', ['x', 'a b']], ['a b', 'a b'])['rougeL'] == pytest.approx(90)
  assert ti.exact_match([['Yes.', 'no'], 'The cat'], ['yes', 'cat'])['exact_match'] == 100


@pytest.fixture
def glue_files():
  settings.use(glue=glue_sources.data_settings(
      source='files', glue_dir=require_shared_data('glue'),
      super_glue_dir=require_shared_data('super_glue')))
  yield
  settings.use()


@pytest.mark.parametrize('name,words', [
    ('glue_sst2_instruct', ('negative', 'positive')), ('glue_rte_instruct', ('yes', 'no')),
    ('glue_qnli_instruct', ('yes', 'no')), ('glue_cola_instruct', ('no', 'yes')),
    ('super_glue_copa_instruct', None)])
def test_glue_instructions(glue_files, name, words):  # pylint: disable=unused-argument
  task = seqio.get_mixture_or_task(name)
  glue_name = {'super_glue_copa_instruct': 'super_glue_copa_v102'}.get(
      name, name.replace('_instruct', '_v002'))
  plain = {ex['idx']: ex for ex in seqio.get_mixture_or_task(glue_name).get_dataset(
      None, split='validation', shuffle=False).take(30).as_numpy_iterator()}
  examples = list(task.get_dataset(None, split='validation', shuffle=False).take(30)
                  .as_numpy_iterator())
  templates = set()
  targets, predictions = [], []
  for ex in examples:
    prompt = ex['inputs_pretokenized'].decode()
    assert prompt.startswith('### Instruction:\n') and prompt.endswith('### Response:\n')
    templates.add(ex['idx'] % 3)
    label = task.postprocess_fn(ex['targets_pretokenized'], example=ex, is_target=True)
    label_name = plain[ex['idx']]['targets_pretokenized'].decode()
    if words is None:
      assert ex['targets_pretokenized'] == ex[('choice1', 'choice2')[label]]
      assert label_name == ('choice1', 'choice2')[label]
    else:
      assert ex['targets_pretokenized'].decode() == words[label]
      classes = registry.label_words(glue_name)
      assert classes[label] == label_name
    targets.append(label)
    predictions.append(task.postprocess_fn(b'not a label', example=ex))
  assert templates == {0, 1, 2}
  assert set(predictions) == {-1}
  for fn in task.predict_metric_fns:  # the GLUE metric over the mapped labels
    assert all(v == pytest.approx(100) for v in fn(targets, targets).values())


# ----------------------------------------------------------------------------
# The WIT loss.

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
RESPONSES = [[20, 1], [21, 22, 1], [23, 1]]


def _wit_batch(pack, lp, lr):
  ds = tf.data.Dataset.from_generator(
      lambda: ({'inputs': np.int32(p), 'targets': np.int32(r)}
               for p, r in zip(PROMPTS, RESPONSES)),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})
  out = fc.WitFeatureConverter(pack=pack, prompt_weight=lp, response_weight=lr)(
      ds, {'inputs': 6, 'targets': 5})
  rows = list(out.as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope='module')
def tiny_gpt():
  cfg = families.config('gpt', vocab_size=32, max_positions=32)
  model = decoder.DecoderModel(cfg, loss_normalizing_factor='NUM_WEIGHTED_TOKENS',
                               feature_converter_cls=fc.WitFeatureConverter)
  params = model.init(jax.random.PRNGKey(0), model.dummy_batch(2, 11))['params']
  params = jax.tree_util.tree_map(lambda x: getattr(x, 'value', x), params,
                                  is_leaf=lambda x: hasattr(x, 'value'))
  return model, params, jax.jit(model.loss_fn), jax.jit(model.logits)


@pytest.mark.parametrize('pack', [False, True])
@pytest.mark.parametrize('lp,lr', [(0.0, 1.0), (1.0, 1.0), (0.1, 0.9), (1.0, 0.0)])
def test_wit_loss_matches_hand_computation(tiny_gpt, pack, lp, lr):
  model, params, loss_fn, logits_fn = tiny_gpt
  batch = _wit_batch(pack, lp, lr)
  logits = np.asarray(logits_fn(params, batch), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  # Find each example in the rows by its tokens; its first |P| positions are prompt.
  total, seen = 0.0, 0
  for p, r in zip(PROMPTS, RESPONSES):
    seq = p + r
    for row in range(len(nll)):
      tokens = batch['decoder_target_tokens'][row].tolist()
      for start in range(len(tokens) - len(seq) + 1):
        if tokens[start:start + len(seq)] == seq:
          total += lp * nll[row, start:start + len(p)].sum()
          total += lr * nll[row, start + len(p):start + len(seq)].sum()
          seen += 1
          break
      else:
        continue
      break
  assert seen == len(PROMPTS)
  count = sum((lp != 0) * len(p) + (lr != 0) * len(r) for p, r in zip(PROMPTS, RESPONSES))
  loss, _ = loss_fn(params, batch, None)
  assert float(loss) == pytest.approx(total / count, rel=1e-5)
  if pack:
    assert len(nll) < len(PROMPTS)  # examples share rows
    starts = (batch['decoder_positions'] == 0) & (batch['decoder_segment_ids'] > 0)
    assert starts.sum() == len(PROMPTS) and not batch['decoder_input_tokens'][starts].any()


def test_prompt_attention_is_causal(tiny_gpt):
  model, params, _, logits_fn = tiny_gpt
  batch = _wit_batch(False, 0.1, 0.9)
  assert 'decoder_causal_attention' not in batch
  changed = dict(batch, decoder_input_tokens=batch['decoder_input_tokens'].copy())
  changed['decoder_input_tokens'][0, 3] = 30  # the last prompt token of example 0
  a, b = logits_fn(params, batch), logits_fn(params, changed)
  np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)  # earlier positions unaffected
  assert not np.allclose(a[0, 3], b[0, 3])
  assert batch['decoder_prompt_mask'][0].tolist() == [1, 1, 1, 1] + [0] * 7
  # What generation sees: BOS + the prompt, its length, causal (no prefix attention).
  from t5x_lite import evaluation  # pylint: disable=g-import-not-at-top
  from t5x_lite.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  evaluator = evaluation.Evaluator(model, Partitioner(), {'inputs': 6, 'targets': 5}, 1)
  prompt = evaluator._prompt(batch)  # pylint: disable=protected-access
  assert prompt['decoder_prompt_lengths'].tolist() == [len(p) for p in PROMPTS]
  assert set(prompt) == {'decoder_input_tokens', 'decoder_prompt_lengths'}
  for row, p in zip(prompt['decoder_input_tokens'], PROMPTS):
    assert row.tolist() == [0] + p + [0] * (10 - len(p))


@pytest.mark.parametrize('pack', [False, True])
def test_batch_shapes_without_data_are_the_converted_batches(tiny_gpt, pack):
  """runs.converter_batch_shapes (precompile, infer: no data read) gives the
  names, lengths and dtypes of the features the WIT converters produce."""
  model = tiny_gpt[0]
  batch = _wit_batch(pack, 0.1, 0.9)
  shapes = runs.converter_batch_shapes(model.__class__(
      model.config, loss_normalizing_factor='NUM_WEIGHTED_TOKENS',
      feature_converter_cls=lambda pack: fc.WitFeatureConverter(pack=pack)),
      {'inputs': 6, 'targets': 5}, 2, pack)
  assert {k: (v.shape[1], np.dtype(v.dtype)) for k, v in shapes.items()} == {
      k: (v.shape[1], v.dtype) for k, v in batch.items()}
  ds = tf.data.Dataset.from_tensors({'inputs': np.int32([5, 6, 1]), 'targets': np.int32([7, 1])})
  lengths = {'inputs': 4, 'targets': 3}
  converter = fc.WitEncDecFeatureConverter(pack=pack)
  got = converter(ds, lengths).element_spec
  want = runs.converter_batch_shapes(families.tiny('t5').__class__(
      families.config('t5'), feature_converter_cls=lambda pack: converter), lengths, 1, pack)
  assert {k: (v.shape[1], np.dtype(v.dtype)) for k, v in want.items()} == {
      k: (v.shape[0], v.dtype.as_numpy_dtype) for k, v in got.items()}


def test_encoder_decoder_weights_and_prompt_weight_error():
  with pytest.raises(UserError, match='PROMPT_LOSS_WEIGHT'):
    fc.WitEncDecFeatureConverter(prompt_weight=0.1)
  with pytest.raises(UserError):
    fc.WitFeatureConverter(prompt_weight=0.0, response_weight=0.0)
  ds = tf.data.Dataset.from_tensors({'inputs': np.int32([5, 6, 1]), 'targets': np.int32([7, 1])})
  lengths = {'inputs': 4, 'targets': 3}
  got = next(fc.WitEncDecFeatureConverter(response_weight=0.7)(ds, lengths).as_numpy_iterator())
  ref = next(seqio.EncDecFeatureConverter(pack=False)(ds, lengths).as_numpy_iterator())
  np.testing.assert_allclose(got['decoder_loss_weights'], 0.7 * ref['decoder_loss_weights'])
  assert set(got) == set(ref)


# ----------------------------------------------------------------------------
# Training and evaluation end to end.


@pytest.mark.usefixtures('shared_instructions')
def test_tiny_gpt_trains_and_scores_rouge_on_heldout_tasks(tmp_path):
  cfg = families.config('gpt', vocab_size=8192, emb_dim=32, head_dim=16, mlp_dim=64,
                        num_layers=1, max_positions=128)
  model = decoder.DecoderModel(cfg, loss_normalizing_factor='NUM_WEIGHTED_TOKENS',
                               feature_converter_cls=fc.WitFeatureConverter)
  from t5x_lite import optimizers  # pylint: disable=g-import-not-at-top
  data = runs.Data('sni_train_mixture_gpt', {'inputs': 48, 'targets': 8}, batch_size=4)
  result = train_lib.train(
      config=runs.TrainConfig(model, optimizers.adamw(1e-3), data), train_steps=3,
      model_dir=str(tmp_path), checkpoint=train_lib.CheckpointConfig(3, async_save=False),
      evaluation=train_lib.EvalConfig(3, 'sni_heldout_mixture_gpt', num_examples=2),
      log_every=1, progress_bar=False)
  assert math.isfinite(result['loss'])
  for name in ti.SNI_HELDOUT_TASKS:
    value = result[f'eval/sni_{name}_gpt/rougeL']
    assert isinstance(value, float) and 0.0 <= value <= 100.0
  with open(tmp_path / 'eval' / '3' / 'sni_task140_gpt.jsonl') as f:
    row = json.loads(f.readline())
  assert row['inputs'].endswith('### Response:\n')  # the prompt only, no response


def test_built_in_tasks_without_their_files_say_which_setting(tmp_path):
  """A directory without the samples still registers every built-in task; using
  one is one error naming the missing file and the setting that supplies it."""
  from t5x_lite.tasks import preferences as tp  # pylint: disable=g-import-not-at-top
  try:
    names = ti.register_shared_samples(str(tmp_path))
    pairs = tp.register_shared_samples(str(tmp_path))
    assert {'alpaca_demo', 'self_instruct_seed_gpt', 'sni_task137', 'sni_task318_gpt'} <= set(names)
    assert set(pairs) == {f'{name}{sfx}' for name in ('hh_rlhf_harmless_sample', 'dpo_en_demo')
                          for sfx in ('', '_gpt', '_bert')}
    sni = tmp_path / 'super_natural_instructions' / 'tasks'
    cases = [('sni_train_mixture_gpt', str(sni / ti.SNI_FILES[0]), ti.DATA_DIR_ENV),
             ('alpaca_demo', str(tmp_path / 'alpaca' / 'alpaca_en_demo.json'), ti.DATA_DIR_ENV),
             ('hh_rlhf_harmless_sample_gpt', str(tmp_path / 'hh-rlhf' / 'harmless-base' /
                                                 'test_first200.jsonl'), tp.DATA_DIR_ENV)]
    for name, path, env in cases:
      with pytest.raises(UserError) as missing:
        registry.check_data_available(name, 'train')
      message = str(missing.value)
      assert message.startswith(f'{path} is missing; ') and f'set {env} to' in message
      assert '\n' not in message
      with pytest.raises(UserError, match='is missing'):  # and when read without the check
        registry.tasks_of(name)[0].source.num_input_examples('train')
  finally:  # the built-in registrations again, over the default directories
    ti.register_shared_samples()
    tp.register_shared_samples()
