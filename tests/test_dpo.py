"""Preference data, the DPO / IPO / conservative DPO losses, DPO training with a
frozen or precomputed reference, through the library and the entry points."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

import families
from conftest import main_in_process, read_metrics, require_shared_data, run_env, REPO, SHARED_DATA
from t5x_lite.tasks import preferences as tp
from t5x_lite import losses
from t5x_lite import optimizers
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import feature_converters as fc
from t5x_lite.data import instructions
from t5x_lite.data import pipeline
from t5x_lite.data import preferences
from t5x_lite.errors import UserError
from t5x_lite.models import decoder
from t5x_lite.models import preference
from t5x_lite.partitioning import Partitioner

HH = os.path.join(SHARED_DATA, 'preferences', 'hh-rlhf', 'harmless-base', 'test_first200.jsonl')
DEMO = os.path.join(SHARED_DATA, 'preferences', 'llama_factory', 'dpo_en_demo.json')


@pytest.fixture
def shared_samples():
  """The preference samples in the shared data (the built-in tasks read them too)."""
  return (require_shared_data('preferences', 'hh-rlhf', 'harmless-base', 'test_first200.jsonl'),
          require_shared_data('preferences', 'llama_factory', 'dpo_en_demo.json'))


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------
# The losses.

LOGPS = dict(policy_chosen=[-10.0, -4.0, -7.5], policy_rejected=[-12.0, -3.0, -7.5],
             reference_chosen=[-11.0, -5.0, -8.0], reference_rejected=[-11.5, -2.0, -6.0])


@pytest.mark.parametrize('loss_type,eps', [('sigmoid', 0.0), ('sigmoid', 0.2), ('ipo', 0.0)])
@pytest.mark.parametrize('beta', [0.1, 0.5])
def test_dpo_loss_matches_hand_computation(loss_type, eps, beta):
  got, chosen_r, rejected_r = losses.dpo_loss(
      *(jnp.asarray(v) for v in LOGPS.values()), beta=beta, loss_type=loss_type,
      label_smoothing=eps)
  for i in range(3):
    pc, pr, rc, rr = (LOGPS[k][i] for k in LOGPS)
    h = (pc - rc) - (pr - rr)
    if loss_type == 'ipo':
      want = (h - 1 / (2 * beta)) ** 2
    else:
      want = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    assert float(got[i]) == pytest.approx(want, rel=1e-6)
    assert float(chosen_r[i]) == pytest.approx(beta * (pc - rc), abs=1e-6)
    assert float(rejected_r[i]) == pytest.approx(beta * (pr - rr), abs=1e-6)
  # h = 0 (policy = reference): DPO's loss is log 2, IPO's (1/2β)².
  zero = jnp.zeros(2)
  at_zero = losses.dpo_loss(zero, zero, zero, zero, beta=beta, loss_type=loss_type,
                            label_smoothing=eps)[0]
  want = math.log(2) if loss_type == 'sigmoid' else (1 / (2 * beta)) ** 2
  np.testing.assert_allclose(at_zero, want, rtol=1e-6)


def test_dpo_gradient_is_the_papers():
  """d/d log π(y_c) of -log σ(β h) is -β σ(-β h); the rewards carry no gradient."""
  beta = 0.3
  def total(pc):
    v = {k: jnp.asarray(x) for k, x in LOGPS.items()}
    v['policy_chosen'] = pc
    return jnp.sum(losses.dpo_loss(*v.values(), beta=beta)[0])
  def rewards(pc):
    v = dict(LOGPS, policy_chosen=pc)
    return jnp.sum(sum(losses.dpo_loss(*(jnp.asarray(x) for x in v.values()), beta=beta)[1:]))
  pc = jnp.asarray(LOGPS['policy_chosen'])
  grad = jax.grad(total)(pc)
  np.testing.assert_array_equal(jax.grad(rewards)(pc), 0.0)
  for i in range(3):
    pc, pr, rc, rr = (LOGPS[k][i] for k in LOGPS)
    h = (pc - rc) - (pr - rr)
    assert float(grad[i]) == pytest.approx(-beta / (1 + math.exp(beta * h)), rel=1e-5)


def test_bad_dpo_options_are_user_errors():
  model = decoder.DecoderModel(decoder.GPTConfig(vocab_size=32, emb_dim=8, num_heads=1,
                                                 head_dim=8, mlp_dim=8, num_layers=1))
  for kwargs, match in (({'loss_type': 'kto'}, 'loss_type'), ({'beta': 0.0}, 'beta'),
                        ({'loss_type': 'ipo', 'label_smoothing': 0.1}, 'label_smoothing')):
    with pytest.raises(UserError, match=match):
      preference.DPOModel(model, **kwargs)


# ----------------------------------------------------------------------------
# Readers and tasks.


@pytest.mark.usefixtures('shared_samples')
def test_hh_rlhf_prompt_is_the_shared_dialogue_prefix():
  pairs = preferences.read_pairs_files(HH, 'hh')
  with open(HH) as f:
    raw = [json.loads(line) for line in f]
  assert len(pairs) == len(raw) == 200
  for r, p in zip(raw, pairs):
    assert p['prompt'].endswith('\n\nAssistant:') and p['prompt'].startswith('\n\nHuman:')
    assert p['prompt'] + p['chosen'] == r['chosen']
    assert p['prompt'] + p['rejected'] == r['rejected']
    assert '\n\nAssistant:' not in os.path.commonprefix([p['chosen'], p['rejected']])


@pytest.mark.usefixtures('shared_samples')
def test_sharegpt_demo_and_hand_written_pairs(tmp_path):
  with open(DEMO) as f:
    raw = json.load(f)
  pairs = preferences.read_pairs_files(DEMO, 'sharegpt')
  assert len(pairs) == len(raw) == 300
  one = next(r for r in raw if len(r['conversations']) == 1)
  got = pairs[raw.index(one)]
  assert got == {'prompt': instructions.render_prompt(one['conversations'][0]['value']),
                 'chosen': one['chosen']['value'], 'rejected': one['rejected']['value']}
  path = tmp_path / 'p.jsonl'
  path.write_text(json.dumps({'prompt': 'Say hi.', 'chosen': 'Hi!', 'rejected': 'No.'}) + '\n')
  assert preferences.read_pairs_files(str(path), 'pairs', system='Be kind.') == [{
      'prompt': instructions.render_prompt('Say hi.', system='Be kind.'),
      'chosen': 'Hi!', 'rejected': 'No.'}]


@pytest.mark.parametrize('format,line,match', [
    ('pairs', {'prompt': 'a', 'chosen': 'b'}, "no 'rejected'"),
    ('pairs', {'prompt': 'a', 'chosen': 'same', 'rejected': 'same'}, 'the same'),
    ('hh', {'chosen': 'x', 'rejected': 'y'}, 'Assistant'),
    ('sharegpt', {'conversations': [{'from': 'gpt', 'value': 'a'}],
                  'chosen': {'from': 'gpt', 'value': 'b'},
                  'rejected': {'from': 'gpt', 'value': 'c'}}, 'alternate'),
])
def test_malformed_pairs_name_file_and_line(tmp_path, format, line, match):  # pylint: disable=redefined-builtin
  path = tmp_path / 'bad.jsonl'
  path.write_text('\n' + json.dumps(line) + '\n')
  with pytest.raises(UserError, match=f'bad.jsonl:2: .*{match}'):
    preferences.read_pairs_files(str(path), format)
  with pytest.raises(UserError, match='Unknown preference format'):
    preferences.read_pairs_files(str(path), 'csv')


@pytest.mark.parametrize('gpt', [False, True])
def test_task_features_trim_eos_and_pair_key(tmp_path, gpt):
  path = tmp_path / 'p.jsonl'
  rows = [{'prompt': 'one two three four five six seven eight nine ten ' * 3,
           'chosen': 'alpha beta gamma delta epsilon zeta eta theta', 'rejected': 'no'}]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  name = 'test_prefs' + ('_gpt' if gpt else '')
  task = tp.register_preference_task(name, str(path), 'pairs')
  ex = next(task.get_dataset({'inputs': 8, 'targets': 5}, split='train', shuffle=False)
            .as_numpy_iterator())
  vocab = task.output_features['inputs'].vocabulary
  full = vocab.encode(instructions.render_prompt(rows[0]['prompt']))
  eos = vocab.eos_id
  assert ex['inputs'].tolist() == (full[-8:] if gpt else full[-7:] + [eos])  # keeps the end
  assert ex['chosen'].tolist() == vocab.encode(rows[0]['chosen'])[:4] + [eos]  # keeps the start
  assert ex['rejected'].tolist() == vocab.encode('no') + [eos]
  want_key = tp.pair_key(tf.constant(instructions.render_prompt(rows[0]['prompt'])),
                         tf.constant(rows[0]['chosen']), tf.constant(rows[0]['rejected']))
  assert ex['pair_key'] == int(want_key)


@pytest.mark.usefixtures('shared_samples')
def test_built_in_samples_and_mixture():
  for sfx in ('', '_gpt'):
    assert pipeline.get_task_or_mixture('hh_rlhf_harmless_sample' + sfx).num_input_examples(
        'validation') == 20
    assert pipeline.get_task_or_mixture('dpo_en_demo' + sfx).num_input_examples('train') == 270
    mixture = pipeline.get_task_or_mixture('preference_mixture' + sfx)
    assert sorted(t.name for t in mixture.tasks) == sorted(
        ['hh_rlhf_harmless_sample' + sfx, 'dpo_en_demo' + sfx])


# ----------------------------------------------------------------------------
# Feature conversion.


def _pairs_dataset(pairs):
  return tf.data.Dataset.from_generator(
      lambda: ({'inputs': np.int32(p), 'chosen': np.int32(c), 'rejected': np.int32(r),
                'pair_key': np.int64(k)} for k, (p, c, r) in enumerate(pairs)),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'chosen': tf.TensorSpec([None], tf.int32),
                        'rejected': tf.TensorSpec([None], tf.int32),
                        'pair_key': tf.TensorSpec([], tf.int64)})


def _batch(converter, pairs, lengths):
  rows = list(converter(_pairs_dataset(pairs), lengths).as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_decoder_only_conversion_by_hand():
  batch = _batch(fc.PreferenceFeatureConverter(), [([5, 6, 7], [20, 1], [21, 22, 1])],
                 {'inputs': 4, 'targets': 3})
  assert sorted(batch) == sorted(f'{s}_{k}' for s in ('chosen', 'rejected') for k in (
      'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights'))
  assert batch['chosen_decoder_target_tokens'][0].tolist() == [5, 6, 7, 20, 1, 0, 0]
  assert batch['chosen_decoder_input_tokens'][0].tolist() == [0, 5, 6, 7, 20, 1, 0]
  assert batch['chosen_decoder_loss_weights'][0].tolist() == [0, 0, 0, 1, 1, 0, 0]
  assert batch['rejected_decoder_target_tokens'][0].tolist() == [5, 6, 7, 21, 22, 1, 0]
  assert batch['rejected_decoder_loss_weights'][0].tolist() == [0, 0, 0, 1, 1, 1, 0]
  with pytest.raises(UserError, match='not packed'):
    fc.PreferenceFeatureConverter(pack=True)


def test_encoder_decoder_conversion_by_hand():
  batch = _batch(fc.PreferenceEncDecFeatureConverter(keep_pair_key=True),
                 [([5, 6, 1], [20, 1], [21, 22, 1])], {'inputs': 4, 'targets': 4})
  assert batch['encoder_input_tokens'][0].tolist() == [5, 6, 1, 0]
  assert batch['chosen_decoder_target_tokens'][0].tolist() == [20, 1, 0, 0]
  assert batch['chosen_decoder_input_tokens'][0].tolist() == [0, 20, 1, 0]
  assert batch['rejected_decoder_loss_weights'][0].tolist() == [1, 1, 1, 0]
  assert batch['pair_key'].tolist() == [0]


def test_cached_reference_logps_are_looked_up_by_key(tmp_path):
  path = str(tmp_path / 'ref.npz')
  np.savez(path, pair_key=np.int64([7, 0, 1]), chosen=np.float32([-7, -1, -2]),
           rejected=np.float32([-70, -10, -20]))
  pairs = [([5], [6, 1], [7, 1])] * 2  # keys 0 and 1
  batch = _batch(fc.PreferenceFeatureConverter(reference_logps_path=path), pairs,
                 {'inputs': 2, 'targets': 2})
  assert batch['reference_chosen_logps'].tolist() == [-1, -2]
  assert batch['reference_rejected_logps'].tolist() == [-10, -20]
  assert 'pair_key' not in batch
  with pytest.raises(tf.errors.InvalidArgumentError, match='no reference log-probs'):
    _batch(fc.PreferenceFeatureConverter(reference_logps_path=path),
           [([5], [6, 1], [7, 1])] * 3, {'inputs': 2, 'targets': 2})
  with pytest.raises(UserError, match='precompute_reference'):
    fc.PreferenceFeatureConverter(reference_logps_path=str(tmp_path / 'none.npz'))(
        _pairs_dataset(pairs), {'inputs': 2, 'targets': 2})


# ----------------------------------------------------------------------------
# The model.

V = 32
A_TOKENS, B_TOKENS = np.arange(2, 10), np.arange(10, 18)  # chosen / rejected vocabularies


def _tiny(family):
  return families.tiny(family, vocab_size=V, emb_dim=32, head_dim=16, mlp_dim=64, num_layers=1)


def _synthetic(n, seed):
  """Prompts of random tokens; the chosen response is drawn from A_TOKENS, the
  rejected one from B_TOKENS."""
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(2, V, 4)), list(rng.choice(A_TOKENS, 3)) + [1],
           list(rng.choice(B_TOKENS, 3)) + [1]) for _ in range(n)]


LENGTHS = {'inputs': 5, 'targets': 4}


def _converted(dpo, pairs):
  return _batch(dpo.converter_cls()(), pairs, LENGTHS)


@pytest.mark.parametrize('family', ['gpt', 't5'])
def test_loss_fn_matches_log_probs_by_hand(family):
  base = _tiny(family)
  dpo = preference.DPOModel(base, beta=0.2)
  batch = _converted(dpo, _synthetic(3, 0))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  params = jax.tree_util.tree_map(
      lambda x: getattr(x, 'value', x), dpo.init(jax.random.PRNGKey(0), shapes)['params'],
      is_leaf=lambda x: hasattr(x, 'value'))
  reference = jax.tree_util.tree_map(lambda x: x * 0.9, params)
  logits_fn = jax.jit(base.logits)

  def logps(p, side):
    feats = {k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + '_')}
    if 'encoder_input_tokens' in batch:
      feats['encoder_input_tokens'] = batch['encoder_input_tokens']
    logits = np.asarray(logits_fn(p, feats), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, feats['decoder_target_tokens'][..., None], -1)[..., 0]
    return (tok * feats['decoder_loss_weights']).sum(-1)

  loss_fn = jax.jit(dpo.loss_fn)
  loss, metrics = loss_fn(params, batch, None, frozen={'reference': reference})
  pc, pr, rc, rr = logps(params, 'chosen'), logps(params, 'rejected'), logps(
      reference, 'chosen'), logps(reference, 'rejected')
  h = (pc - rc) - (pr - rr)
  want = np.mean([-_log_sigmoid(0.2 * x) for x in h])
  assert float(loss) == pytest.approx(want, rel=1e-4)
  assert float(metrics['chosen_logps']) == pytest.approx(pc.mean(), rel=1e-4)
  assert float(metrics['reward_accuracy']) == pytest.approx(np.mean(pc - rc > pr - rr))
  assert float(metrics['reward_margin']) == pytest.approx(0.2 * (h.mean()), rel=1e-3, abs=1e-6)
  # Precomputed reference log-probs in the batch give the same loss, without params.
  cached = dict(batch, reference_chosen_logps=np.float32(rc), reference_rejected_logps=np.float32(rr))
  assert float(loss_fn(params, cached, None)[0]) == pytest.approx(float(loss), rel=1e-4)
  with pytest.raises(UserError, match='reference'):
    dpo.loss_fn(params, batch, None)


@pytest.mark.parametrize('family', ['gpt', 't5'])
def test_dpo_learns_a_synthetic_preference(family):
  """A tiny model trained 200 steps to prefer responses of A_TOKENS: held-out reward
  accuracy above 0.9; the reference stays the initial params."""
  dpo = preference.DPOModel(_tiny(family), beta=0.1)
  train = _converted(dpo, _synthetic(512, 1))
  heldout = _converted(dpo, _synthetic(64, 2))
  shapes = {k: jax.ShapeDtypeStruct((16,) + v.shape[1:], v.dtype) for k, v in train.items()}
  trainer = trainer_lib.Trainer(dpo, optimizers.adamw(3e-3, weight_decay=0.0), Partitioner(),
                                shapes)
  state = trainer.init_state(0)
  initial = jax.device_get(state.params)
  assert state.frozen is not None
  flat = jax.tree_util.tree_leaves(state.params)[0], jax.tree_util.tree_leaves(state.frozen['reference'])[0]
  assert flat[0].unsafe_buffer_pointer() != flat[1].unsafe_buffer_pointer()

  def accuracy(state):
    return np.mean([float(trainer.eval_metrics(state, {k: v[i:i + 16] for k, v in heldout.items()})
                          ['reward_accuracy']) for i in range(0, 64, 16)])

  before = accuracy(state)
  for step in range(200):
    i = (step * 16) % 512
    state, metrics = trainer.train_step(state, {k: v[i:i + 16] for k, v in train.items()})
  after = accuracy(state)
  assert after > 0.9, (before, after)
  assert float(metrics['reward_margin']) > 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.frozen['reference']), initial)


# ----------------------------------------------------------------------------
# Entry points.

TINY_GPT_DPO = [
    '--gin_file=gin/gpt_dpo.gin',
    '--gin.decoder.GPTConfig.emb_dim=32',
    '--gin.decoder.GPTConfig.num_heads=2',
    '--gin.decoder.GPTConfig.head_dim=16',
    '--gin.decoder.GPTConfig.mlp_dim=64',
    '--gin.decoder.GPTConfig.num_layers=2',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}",
    '--gin.MIXTURE_OR_TASK_NAME="hh_rlhf_harmless_sample_gpt"',
    '--gin.TRAIN_STEPS=3',
    '--gin.EVAL_PERIOD=3',
    '--gin.train_script.train.log_every=1',
    '--gin.train_script.train.progress_bar=False',
]


def _run(module, *args, devices=1):
  proc = subprocess.run([sys.executable, '-m', module, *TINY_GPT_DPO, *args], cwd=REPO,
                        env=run_env(devices), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f'{module} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}'
  return proc


@pytest.mark.slow
@pytest.mark.usefixtures('shared_samples')
def test_precomputed_reference_trains_like_the_kept_reference_on_8_devices(tmp_path, capsys):
  """gin/gpt_dpo.gin: the reference kept in the train state (8 fake devices, data x
  fsdp x model, an entry point's process of its own) and the precomputed
  reference log-probs (1 device, the entry points' mains in this process) give
  the same run."""
  from t5x_lite import precompute_reference  # pylint: disable=g-import-not-at-top
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  kept, cached = str(tmp_path / 'kept'), str(tmp_path / 'cached')
  _run('t5x_lite.train', f"--gin.MODEL_DIR='{kept}'", '--gin_file=configs/meshes/cpu_8_fake.gin',
       devices=8)
  ref = str(tmp_path / 'ref.npz')
  main_in_process(precompute_reference, [*TINY_GPT_DPO, f"--gin.REFERENCE_LOGPS_PATH='{ref}'"])
  assert 'of 200 pairs' in capsys.readouterr().out
  main_in_process(train, [*TINY_GPT_DPO, f"--gin.MODEL_DIR='{cached}'",
                          f"--gin.REFERENCE_LOGPS_PATH='{ref}'"])
  a, b = read_metrics(kept), read_metrics(cached)
  assert [r['step'] for r in a] == [1, 2, 3, 3]
  assert a[0]['loss'] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
  # At step 1 the policy is the reference: every margin is rounding noise, so
  # the share of positive ones (the accuracies) is arbitrary there.
  noise = {(1, 'accuracy'), (1, 'reward_accuracy')}
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb)
    for k in ra:
      if k not in ('seconds_per_step', 'tokens_per_second') and (ra['step'], k) not in noise:
        assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-4), (ra['step'], k)
  assert a[-1]['eval/hh_rlhf_harmless_sample_gpt/num_examples'] == 8
  def saved(model_dir):
    path = os.path.join(model_dir, 'checkpoints', '3', 'state')
    return set(ocp.PyTreeCheckpointer().metadata(path).item_metadata.keys())
  assert saved(kept) == {'step', 'params', 'opt_state', 'rng', 'reference'}
  assert saved(cached) == {'step', 'params', 'opt_state', 'rng'}  # no second model
