"""Reward models (t5x_lite/models/reward.py): the Bradley–Terry loss by hand,
the pair and single-response layouts, a synthetic preference learnt, the gin
run and infer's rewards."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

import families
from conftest import main_in_process, read_metrics, require_shared_data
from t5x_lite import infer_inputs
from t5x_lite import losses
from t5x_lite import optimizers
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import cls_features
from t5x_lite.data import feature_converters as fc
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
from t5x_lite.models import classification
from t5x_lite.models import decoder
from t5x_lite.models import reward
from t5x_lite.partitioning import Partitioner
from t5x_lite.tasks import preferences as tasks


def _neg_log_sigmoid(x):
  return np.log1p(np.exp(-x))


def test_bradley_terry_loss_margin_centring_and_gradient_by_hand():
  """-log σ(r_c - r_r - m) + c (r_c + r_r)² and its gradient, against numpy:
  d/dr_c = -(1 - σ(d)) + 2c (r_c + r_r), d/dr_r = (1 - σ(d)) + 2c (r_c + r_r)."""
  rc = np.array([1.0, -0.5, 2.0, 0.0], np.float32)
  rr = np.array([0.0, 0.5, 2.5, 0.0], np.float32)
  m = np.array([0.5, 0.0, 1.0, 0.0], np.float32)
  c = 0.01
  d = rc.astype(np.float64) - rr - m
  want = _neg_log_sigmoid(d) + c * (rc + rr) ** 2
  got = losses.bradley_terry_loss(rc, rr, m, c)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(got[3]) == pytest.approx(np.log(2.0))  # no preference yet: log 2
  sig = 1 / (1 + np.exp(-d))
  grad_c, grad_r = jax.grad(lambda a, b: losses.bradley_terry_loss(a, b, m, c).sum(),
                            argnums=(0, 1))(rc, rr)
  np.testing.assert_allclose(grad_c, -(1 - sig) + 2 * c * (rc + rr), rtol=1e-5)
  np.testing.assert_allclose(grad_r, (1 - sig) + 2 * c * (rc + rr), rtol=1e-5)
  # A scalar margin, no centring: the plain Bradley–Terry loss shifted by it.
  np.testing.assert_allclose(losses.bradley_terry_loss(rc, rr, 0.5),
                             _neg_log_sigmoid(rc.astype(np.float64) - rr - 0.5), rtol=1e-6)


# ----------------------------------------------------------------------------
# Layouts.

V = 32
A_TOKENS, B_TOKENS = np.arange(2, 10), np.arange(10, 18)  # chosen / rejected vocabularies
LENGTHS = {'inputs': 5, 'targets': 4}


def _pairs_dataset(pairs, margins=None):
  def gen():
    for i, (p, c, r) in enumerate(pairs):
      ex = {'inputs': np.int32(p), 'chosen': np.int32(c), 'rejected': np.int32(r)}
      yield ex if margins is None else dict(ex, margin=np.float32(margins[i]))
  spec = {k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'chosen', 'rejected')}
  if margins is not None:
    spec['margin'] = tf.TensorSpec([], tf.float32)
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


def _stack(ds):
  rows = list(ds.as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _convert(model, pairs, margins=None, lengths=LENGTHS):
  return _stack(model.FEATURE_CONVERTER_CLS(pack=False)(_pairs_dataset(pairs, margins), lengths))


def _convert_single(model, examples, lengths=LENGTHS):
  """Single (prompt, response) examples as infer and RL give them."""
  ds = tf.data.Dataset.from_generator(
      lambda: ({'inputs': np.int32(p), 'targets': np.int32(r)} for p, r in examples),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in ('inputs', 'targets')})
  return _stack(model.FEATURE_CONVERTER_CLS(pack=False)(ds, lengths))


def test_bert_pair_layout_by_hand_and_single_responses_as_one_side():
  conv = cls_features.PreferenceBertFeatureConverter(cls_id=3, sep_id=4)
  batch = _stack(conv(_pairs_dataset([([5, 6], [20, 21], [22])], margins=[0.5]),
                      {'inputs': 3, 'targets': 4}))
  assert batch['chosen_input_tokens'][0].tolist() == [3, 5, 6, 4, 20, 21, 4]
  assert batch['chosen_segment_ids'][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
  assert batch['rejected_input_tokens'][0].tolist() == [3, 5, 6, 4, 22, 4, 0]
  assert batch['rejected_attention_mask'][0].tolist() == [1, 1, 1, 1, 1, 1, 0]
  assert batch['margin'].tolist() == [0.5]
  single = _stack(fc.PreferenceFeatureConverter()(
      tf.data.Dataset.from_tensors({'inputs': [5, 6, 7], 'targets': [20, 1]}),
      {'inputs': 4, 'targets': 3}))
  assert single['decoder_target_tokens'][0].tolist() == [5, 6, 7, 20, 1, 0, 0]
  assert single['decoder_loss_weights'][0].tolist() == [0, 0, 0, 1, 1, 0, 0]


def test_pairs_files_carry_per_pair_margins_to_the_batch(tmp_path):
  """A 'pairs' file whose records have a 'margin' gives it to every pair, through
  the task and the converter; a file with some margins missing, or one that is
  not a number, is one error naming the file and line."""
  from t5x_lite.data import preferences  # pylint: disable=g-import-not-at-top
  rows = [{'prompt': 'p1', 'chosen': 'good', 'rejected': 'bad', 'margin': 2},
          {'prompt': 'p2', 'chosen': 'fine', 'rejected': 'poor', 'margin': 0.5}]
  path = tmp_path / 'm.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert [p['margin'] for p in preferences.read_pairs_files(str(path), 'pairs')] == [2.0, 0.5]
  task = tasks.register_preference_task('reward_margin_test_gpt', str(path))
  ds = task.get_dataset(LENGTHS, split='train', shuffle=False)
  batch = _stack(fc.PreferenceFeatureConverter()(ds, LENGTHS))
  assert batch['margin'].tolist() == [2.0, 0.5]
  path.write_text(''.join(json.dumps(r) + '\n' for r in [rows[0], dict(rows[1], margin=None)]))
  with pytest.raises(UserError, match="m.jsonl:2: field 'margin' must be a number"):
    preferences.read_pairs_files(str(path), 'pairs')
  del rows[1]['margin']
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  with pytest.raises(UserError, match="m.jsonl:1 has a 'margin' but 1 pairs have none"):
    preferences.read_pairs_files(str(path), 'pairs')


def _tiny(family, **overrides):
  cfg = families.config(family, vocab_size=V, emb_dim=32, head_dim=16, mlp_dim=64,
                        num_layers=1)
  if family == 'gpt':
    head = classification.GptClassificationModel(cfg, num_classes=1, classifier_dropout_rate=0.0)
  else:
    head = classification.BertClassificationModel(cfg, num_classes=1, classifier_dropout_rate=0.0)
  return reward.RewardModel(head, **overrides)


def _synthetic(n, seed):
  """Prompts of random tokens; the chosen response is drawn from A_TOKENS, the
  rejected one from B_TOKENS (1 = EOS); lengths vary so that padding matters."""
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(2, V, rng.integers(2, 6))),
           list(rng.choice(A_TOKENS, rng.integers(1, 4))) + [1],
           list(rng.choice(B_TOKENS, rng.integers(1, 4))) + [1]) for _ in range(n)]


def _params(model, batch, seed=0):
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  return jax.tree_util.tree_map(lambda x: getattr(x, 'value', x),
                                model.init(jax.random.PRNGKey(seed), shapes)['params'],
                                is_leaf=lambda x: hasattr(x, 'value'))


@pytest.mark.parametrize('family', ['gpt', 'bert'])
def test_loss_fn_is_bradley_terry_of_the_single_response_rewards(family):
  """The paired loss and metrics equal numpy's over `score` of each side as a
  single (prompt, response) example; GPT's reward is the head at the EOS."""
  model = _tiny(family, center_rewards_coefficient=0.1)
  pairs = _synthetic(4, 0)
  margins = [0.0, 0.5, 1.0, -0.5]
  batch = _convert(model, pairs, margins)
  params = _params(model, batch)
  score = jax.jit(model.score)
  rc = np.asarray(score(params, _convert_single(model, [(p, c) for p, c, _ in pairs])), np.float64)
  rr = np.asarray(score(params, _convert_single(model, [(p, r) for p, _, r in pairs])), np.float64)
  loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
  want = _neg_log_sigmoid(rc - rr - np.array(margins)) + 0.1 * (rc + rr) ** 2
  assert float(loss) == pytest.approx(want.mean(), rel=1e-5)
  assert float(metrics['accuracy']) == pytest.approx(np.mean(rc > rr))
  assert float(metrics['reward_margin']) == pytest.approx(np.mean(rc - rr), rel=1e-4, abs=1e-6)
  assert float(metrics['chosen_rewards']) == pytest.approx(rc.mean(), rel=1e-4, abs=1e-6)
  if family == 'gpt':  # the classifier's own head, read at the EOS by hand
    p, c, _ = pairs[0]
    tokens = np.zeros([1, 9], np.int32)
    tokens[0, :len(p) + len(c)] = p + c
    logits = jax.jit(model.model.class_logits)(params, {
        'decoder_input_tokens': tokens, 'decoder_attention_mask': (tokens > 0).astype(np.int32),
        'extract_position': np.int32([len(p) + len(c) - 1])})
    assert float(logits[0, 0]) == pytest.approx(rc[0], rel=1e-5, abs=1e-6)


def test_reward_model_learns_a_synthetic_preference():
  """A tiny GPT reward model trained on pairs whose chosen responses come from
  one token set and the rejected from another: held-out pairwise accuracy >= 0.95."""
  model = _tiny('gpt')
  train = _convert(model, _synthetic(480, 1))
  heldout = _convert(model, _synthetic(64, 2))
  shapes = {k: jax.ShapeDtypeStruct((16,) + v.shape[1:], v.dtype) for k, v in train.items()}
  trainer = trainer_lib.Trainer(model, optimizers.adamw(3e-3, weight_decay=0.0), Partitioner(),
                                shapes)
  state = trainer.init_state(0)

  def held_out(state):
    rows = [trainer.eval_metrics(state, {k: v[i:i + 16] for k, v in heldout.items()})
            for i in range(0, 64, 16)]
    return {k: np.mean([float(r[k]) for r in rows]) for k in ('accuracy', 'reward_margin')}

  before = held_out(state)
  for step in range(30):
    i = (step * 16) % 480
    state, _ = trainer.train_step(state, {k: v[i:i + 16] for k, v in train.items()})
  after = held_out(state)
  assert before['accuracy'] < 0.8 and after['accuracy'] >= 0.95, (before, after)
  assert after['reward_margin'] > before['reward_margin'] + 1.0


def test_initial_lm_checkpoint_gives_all_but_the_head(tmp_path):
  """FRESH_PARAMS: a reward run from a GPT language model's checkpoint takes
  its whole network and starts the scalar head afresh."""
  lm = decoder.DecoderModel(_tiny('gpt').config)
  lm_params = _params(lm, lm.dummy_batch(1, 9), seed=3)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(str(tmp_path / 'lm'), args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': lm_params})))
  model = _tiny('gpt')
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in model.dummy_batch(2, 5, 4).items()}
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-3), Partitioner(), shapes)
  params = jax.device_get(trainer.initial_state(0, str(tmp_path / 'lm'),
                                                fresh=model.FRESH_PARAMS).params)
  assert set(params) == set(lm_params) | {'classifier'}
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         {k: params[k] for k in lm_params}, lm_params)
  assert np.abs(params['classifier']['kernel']).sum() > 0


def test_bad_configs_are_one_line_user_errors():
  cfg = families.config('gpt')
  cases = [
      (lambda: reward.RewardModel(decoder.DecoderModel(cfg)), 'needs a scalar head.*DecoderModel'),
      (lambda: reward.RewardModel(classification.GptClassificationModel(cfg, num_classes=2)),
       'num_classes = 1; got GptClassificationModel with num_classes=2'),
      (lambda: reward.RewardModel(classification.GptClassificationModel(
          cfg, num_classes=1, lm_weight=0.5)), 'lm_weight = 0'),
      (lambda: reward.RewardModel(classification.GptClassificationModel(cfg, num_classes=1),
                                  center_rewards_coefficient=-1), 'must be >= 0'),
  ]
  task = tasks.register_preference_task('reward_lines_test_gpt', 'unread.jsonl', format='hh')
  read = lambda *lines: infer_inputs.response_examples(task, lines, LENGTHS, 'in.jsonl')
  cases += [
      (lambda: read(infer_inputs.Line(3, 'a prompt, no response')), 'in.jsonl:3: .*prompt TAB'),
      (lambda: read(infer_inputs.Line(4, '{}', {'prompt': 'p'})),
       'in.jsonl:4: .*"prompt" and "response"; the line has'),
  ]
  for make, match in cases:
    with pytest.raises(UserError, match=match) as e:
      make()
    assert '\n' not in str(e.value)
  ex, = read(infer_inputs.Line(5, 'Hi\tthere'))[0]  # 'hh': the prompt as it is
  assert ex['inputs_pretokenized'] == 'Hi' and ex['targets'][-1] == 1  # EOS


# ----------------------------------------------------------------------------
# The gin run and infer.

TINY = ['--gin.decoder.GPTConfig.emb_dim=32', '--gin.decoder.GPTConfig.num_heads=2',
        '--gin.decoder.GPTConfig.head_dim=16', '--gin.decoder.GPTConfig.mlp_dim=64',
        '--gin.decoder.GPTConfig.num_layers=1']
RUN_LENGTHS = {'inputs': 48, 'targets': 16}


def test_gin_run_logs_held_out_accuracy_and_infer_scores_as_model_score(tmp_path):
  """gin/gpt_reward.gin for 2 steps logs held-out pairwise accuracy and margin;
  infer then writes one reward per JSONL line, equal to `score` of the
  checkpoint's params on the same (prompt, response) tokens built by hand."""
  from t5x_lite import infer  # pylint: disable=g-import-not-at-top
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  require_shared_data('preferences', 'hh-rlhf', 'harmless-base', 'test_first200.jsonl')
  model_dir = str(tmp_path / 'run')
  main_in_process(train, [
      '--gin_file=gin/gpt_reward.gin', *TINY, f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.MIXTURE_OR_TASK_NAME="hh_rlhf_harmless_sample_gpt"',
      f'--gin.TASK_FEATURE_LENGTHS={RUN_LENGTHS}', '--gin.TRAIN_STEPS=2', '--gin.EVAL_PERIOD=2',
      '--gin.CHECKPOINT_PERIOD=2', '--gin.BATCH_SIZE=4', '--gin.EVAL_NUM_EXAMPLES=8',
      '--gin.train_script.train.log_every=1', '--gin.train_script.train.progress_bar=False'])
  rows = read_metrics(model_dir)
  evals = [r for r in rows if any('reward_margin' in k and 'eval' in k for k in r)]
  assert evals, rows
  keys = {k for r in evals for k in r}
  assert {'eval/hh_rlhf_harmless_sample_gpt/accuracy',
          'eval/hh_rlhf_harmless_sample_gpt/reward_margin'} <= keys, keys
  lines = [{'prompt': '\n\nHuman: How do I bake bread?\n\nAssistant:',
            'response': ' Mix flour, water and yeast, knead, let it rise, then bake it.'},
           {'prompt': '\n\nHuman: Tell me a secret.\n\nAssistant:', 'response': ' No.'}]
  path = tmp_path / 'responses.jsonl'
  path.write_text(''.join(json.dumps(x) + '\n' for x in lines))
  main_in_process(infer, [
      '--gin_file=configs/runs/infer.gin', f'--gin_file={model_dir}/config.gin',
      f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INPUT_FILE='{path}'",
      f'--gin.TASK_FEATURE_LENGTHS={RUN_LENGTHS}', '--gin.BATCH_SIZE=2'])
  with open(os.path.join(model_dir, 'infer', 'responses.jsonl')) as f:
    out = [json.loads(line) for line in f]
  assert [r['line'] for r in out] == [1, 2]
  params = ocp.PyTreeCheckpointer().restore(
      os.path.join(model_dir, 'checkpoints', '2', 'state'))['params']
  vocab = vocab_lib.embedded_bpe_vocabulary()
  tokens = np.zeros([2, sum(RUN_LENGTHS.values())], np.int32)
  for i, x in enumerate(lines):  # HH prompts as they are; the response cut, then EOS
    ids = vocab.encode(x['prompt'])[-RUN_LENGTHS['inputs']:] + vocab.encode(
        x['response'])[:RUN_LENGTHS['targets'] - 1] + [vocab.eos_id]
    tokens[i, :len(ids)] = ids
  cfg = decoder.GPTConfig(vocab_size=8192, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                          num_layers=1, max_positions=512)
  model = reward.RewardModel(classification.GptClassificationModel(cfg, num_classes=1))
  want = model.score(params, {'decoder_target_tokens': tokens})
  np.testing.assert_allclose([r['score'] for r in out], want, rtol=1e-5, atol=1e-6)
  assert [r['outputs'] for r in out] == [r['score'] for r in out]
  assert out[0]['inputs'] == lines[0]['prompt'] and out[1]['targets'] == lines[1]['response']
