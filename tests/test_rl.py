"""RL (models/policy.py, rollouts.py): the rollout layouts against the sampler's
own log-probs, GRPO / RLOO / PPO of a tiny GPT and GRPO of a tiny T5 learning
the verifiable task, PPO against a learned reward model, resume, non-finite
rewards and one-line errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

import t5x_lite.tasks  # pylint: disable=unused-import
from conftest import read_metrics
from t5x_lite import infer as infer_lib
from t5x_lite import optimizers
from t5x_lite import rewards
from t5x_lite import rollouts
from t5x_lite import runs
from t5x_lite import train as train_lib
from t5x_lite.data import sources
from t5x_lite.errors import UserError
from t5x_lite.models import classification
from t5x_lite.models import decoder
from t5x_lite.models import encoder_decoder
from t5x_lite.models import llama
from t5x_lite.models import policy
from t5x_lite.models import reward as reward_lib

import seqio

SIZE = dict(vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, dropout_rate=0.0)
VOWELS = rewards.CharacterSetFraction('aeiou')


def _gpt_config(**overrides):
  return decoder.GPTConfig(**{**SIZE, 'num_layers': 2, 'max_positions': 32,
                              'attention_dropout_rate': 0.0, **overrides})


def _network(family):
  if family == 'gpt':
    return decoder.DecoderModel(_gpt_config())
  if family == 'llama':
    return llama.LlamaModel(llama.LlamaConfig(
        vocab_size=384, emb_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
        num_layers=2, max_positions=32, tie_word_embeddings=False))
  return encoder_decoder.EncoderDecoderModel(encoder_decoder.T5Config(
      **SIZE, num_encoder_layers=2, num_decoder_layers=2))


def _policy(family='gpt', algorithm='grpo', reward=VOWELS, samples=4, **kwargs):
  rollout = policy.RolloutConfig(samples_per_prompt=samples, max_response_length=8,
                                 epochs=2, num_minibatches=2)
  return policy.PolicyModel(_network(family), algorithm=algorithm, rollout=rollout,
                            reward=reward, kl_coef=0.01, **kwargs)


def _train(model, model_dir, steps, batch=8, task='rl_letters', prompt_length=12,
           lr=3e-3, log_every=5, **kwargs):
  config = runs.TrainConfig(model=model, optimizer=optimizers.adamw(lr, weight_decay=0.0),
                            data=runs.Data(task, {'inputs': prompt_length}, batch, pack=False))
  kwargs.setdefault('checkpoint', train_lib.CheckpointConfig(period=1000, async_save=False))
  train_lib.train(config=config, train_steps=steps, model_dir=model_dir, log_every=log_every,
                  progress_bar=False, **kwargs)
  return read_metrics(model_dir)


# ----------------------------------------------------------------------------
# Layouts.


def test_response_mask_ends_at_eos_or_a_sampled_pad():
  responses = jnp.array([[5, 6, 1, 7], [5, 0, 8, 1], [5, 6, 7, 8], [1, 1, 4, 4]])
  kept, mask = rollouts.response_mask(responses, eos_id=1)
  assert kept.tolist() == [[5, 6, 1, 0], [5, 0, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
  assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_decoder_only_sequence_layout_by_hand():
  model = _policy()
  batch = {'prompt_tokens': jnp.array([[5, 6, 0], [7, 0, 0]]),
           'prompt_length': jnp.array([2, 1]),
           'responses': jnp.array([[8, 1, 0], [9, 9, 1]])}
  features, index = model.sequence_batch(batch)
  assert features['decoder_target_tokens'].tolist() == [[5, 6, 8, 1, 0, 0], [7, 9, 9, 1, 0, 0]]
  assert features['decoder_input_tokens'].tolist() == [[0, 5, 6, 8, 1, 0], [0, 7, 9, 9, 1, 0]]
  assert index.tolist() == [[2, 3, 4], [1, 2, 3]]
  generation = model.generation_batch(batch)
  assert generation['decoder_input_tokens'].tolist() == [[0, 5, 6, 0], [0, 7, 0, 0]]
  assert generation['decoder_prompt_lengths'].tolist() == [2, 1]


@pytest.mark.parametrize('family,algorithm', [('gpt', 'grpo'), ('t5', 'grpo'), ('llama', 'ppo')])
def test_teacher_forced_logps_are_the_samplers(family, algorithm):
  """The log-probs of the sampled responses, re-read teacher-forced through
  `sequence_batch`, sum to the sampler's own (temperature 1, no filtering):
  generation and scoring see the same sequences."""
  model = _policy(family, algorithm, samples=1 if algorithm == 'ppo' else 4)
  prompts = {'prompt_tokens': jnp.array([[20, 21, 22, 0], [30, 0, 0, 0], [40, 41, 42, 43]]),
             'prompt_length': jnp.array([3, 1, 4])}
  params = jax.tree_util.tree_map(
      lambda x: x.value if hasattr(x, 'value') else x,
      model.init(jax.random.key(0), prompts), is_leaf=lambda x: hasattr(x, 'value'))['params']
  tokens, sampled = model.predict_batch(params, prompts, jax.random.key(1), method='sample',
                                        max_decode_length=8)
  responses, mask = rollouts.response_mask(tokens, eos_id=1)
  assert bool(jnp.all(responses == tokens))  # (no pad id sampled with these seeds)
  stats = model.token_stats(params, {**prompts, 'responses': responses})
  np.testing.assert_allclose(jnp.sum(stats['logps'] * mask, axis=1), sampled, rtol=1e-5)
  if algorithm == 'ppo':  # the value head starts at 0 (zero-initialised kernel)
    assert stats['values'].shape == responses.shape and not bool(jnp.any(stats['values']))


# ----------------------------------------------------------------------------
# Learning the verifiable task.


@pytest.mark.parametrize('family,algorithm,steps', [
    ('gpt', 'grpo', 30), ('gpt', 'rloo', 30), ('gpt', 'ppo', 40), ('t5', 'grpo', 40)])
def test_policy_learns_the_verifiable_task(family, algorithm, steps, tmp_path):
  """From random init (reward about 0.03), the mean reward reaches 0.8 within
  `steps` iterations; the KL to the reference is logged and finite."""
  model = _policy(family, algorithm, samples=1 if algorithm == 'ppo' else 4)
  rows = _train(model, str(tmp_path), steps, batch=16 if algorithm == 'ppo' else 8)
  rewards_ = [r['reward_mean'] for r in rows]
  assert rewards_[0] <= 0.2 and max(rewards_) >= 0.8, rewards_
  assert all(np.isfinite(r['kl']) for r in rows) and rows[-1]['kl'] > 0
  assert rows[0]['kl'] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
  for key in ('entropy', 'clip_fraction', 'approx_kl', 'response_length', 'rollout_seconds',
              'update_seconds', 'rollout_tokens_per_second', 'reward_std'):
    assert key in rows[-1]
  if algorithm == 'ppo':
    assert {'value_loss', 'explained_variance'} <= set(rows[-1])
    # The checkpoint (policy + value head) generates with the plain model.
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('bcdfg\nxyz12\n')
    written = infer_lib.infer(
        model=model.model, mixture_or_task_name='rl_letters', batch_size=2,
        task_feature_lengths={'inputs': 12, 'targets': 8}, checkpoint_path=str(tmp_path),
        model_dir=str(tmp_path / 'infer'), input_file=str(prompts))
    outputs = [json.loads(line)['outputs'] for line in open(written)]
    assert len(outputs) == 2 and VOWELS('', outputs[0]) >= 0.5, outputs


# ----------------------------------------------------------------------------
# Against a learned reward model.

_LENGTHS = {'inputs': 12, 'targets': 8}


def _vowel_pairs(split, shuffle_files, seed=None):
  """rl_letters prompts; chosen: vowel strings, rejected: consonant strings."""
  del shuffle_files
  rng = np.random.default_rng([0 if seed is None else seed, split == 'train'])
  prompts = t5x_lite.tasks.rl.letters_prompts('validation')[:400]
  pick = lambda letters: ''.join(rng.choice(list(letters), size=rng.integers(2, 8)))
  return tf.data.Dataset.from_tensor_slices({
      'inputs': prompts, 'chosen': [pick('aeiou') for _ in prompts],
      'rejected': [pick('bcdfghklmnpqrst') for _ in prompts]})


def _register_vowel_pairs():
  if 'rl_test_vowel_pairs' not in seqio.TaskRegistry.names():
    # Responses without EOS: the reward model reads the last response character,
    # as it does for a sampled response cut at max_response_length.
    feature = seqio.Feature(seqio.ByteVocabulary(), add_eos=False)
    seqio.TaskRegistry.add(
        'rl_test_vowel_pairs',
        source=sources.FunctionSource(dataset_fn=_vowel_pairs, splits=('train', 'validation')),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={'inputs': feature, 'chosen': feature, 'rejected': feature},
        metric_fns=[])


def _reward_model(**overrides):
  return reward_lib.RewardModel(classification.GptClassificationModel(
      _gpt_config(**overrides), num_classes=1))


@pytest.fixture(scope='module')
def reward_run(tmp_path_factory):
  """A reward model trained on the vowel preference (its checkpoint dir)."""
  _register_vowel_pairs()
  model_dir = str(tmp_path_factory.mktemp('reward'))
  config = runs.TrainConfig(model=_reward_model(), optimizer=optimizers.adamw(3e-3),
                            data=runs.Data('rl_test_vowel_pairs', _LENGTHS, 16, pack=False))
  train_lib.train(config=config, train_steps=40, model_dir=model_dir, log_every=10,
                  progress_bar=False,
                  checkpoint=train_lib.CheckpointConfig(period=40, async_save=False))
  assert read_metrics(model_dir)[-1]['accuracy'] >= 0.95
  return model_dir


def test_ppo_against_a_learned_reward_model_raises_its_reward(reward_run, tmp_path):
  model = _policy('gpt', 'ppo', samples=1,
                  reward=rewards.RewardModelReward(_reward_model(), reward_run))
  rows = _train(model, str(tmp_path), 30, batch=16)
  first, last = rows[0]['reward_mean'], max(r['reward_mean'] for r in rows[-2:])
  assert last > first + 0.5, [r['reward_mean'] for r in rows]


def test_a_reward_model_of_another_config_is_one_line(reward_run, tmp_path):
  model = _policy('gpt', 'ppo', samples=1,
                  reward=rewards.RewardModelReward(_reward_model(emb_dim=48), reward_run))
  with pytest.raises(UserError, match='does not match the reward model config'):
    _train(model, str(tmp_path), 2, batch=16)
  model = _policy('gpt', 'ppo', samples=1,
                  reward=rewards.RewardModelReward(_reward_model(vocab_size=512), reward_run))
  with pytest.raises(UserError, match="must be decoder-only with the policy's vocab_size 384"):
    _train(model, str(tmp_path), 2, batch=16)


# ----------------------------------------------------------------------------
# Resume, non-finite rewards, errors.


def test_resume_repeats_the_iterations_bit_exactly(tmp_path):
  """A run resumed from its step-2 checkpoint (step 4's removed, as after a
  kill) samples, rewards and updates steps 3-4 as the whole run did:
  policy, value head, optimizer state, reference and KL coefficient."""
  model = _policy('gpt', 'ppo', samples=1, kl_target=1.0, kl_horizon=100.0)
  whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
  ckpt = train_lib.CheckpointConfig(period=2, async_save=False)
  rows = _train(model, whole, 4, batch=16, checkpoint=ckpt, log_every=1)
  shutil.copytree(whole, parts)
  shutil.rmtree(os.path.join(parts, 'checkpoints', '4'))
  resumed = _train(model, parts, 4, batch=16, checkpoint=ckpt, log_every=1)
  same = lambda r: {k: v for k, v in r.items() if 'second' not in k}  # all but timings
  assert [same(r) for r in rows] == [same(r) for r in resumed] and len(rows) == 4
  restore = lambda d: ocp.PyTreeCheckpointer().restore(os.path.join(d, 'checkpoints', '4',
                                                                    'state'))
  state, again = restore(whole), restore(parts)
  assert set(state) == {'step', 'params', 'opt_state', 'rng', 'reference', 'kl_coef'}
  assert 'value_head' in state['params'] and float(state['kl_coef']) != 0.01  # adapted
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, again)


def test_a_nonfinite_reward_skips_the_updates_and_stops_in_one_line(tmp_path):
  model = _policy(reward=lambda prompt, response: float('nan'))
  with pytest.raises(UserError, match=r'the loss became non-finite at step 1 and all \d+ updates'):
    _train(model, str(tmp_path), 5, max_nonfinite_steps=2)


def _raises(prompt, response):
  raise ValueError('no score for this')


@pytest.mark.parametrize('make,kwargs,message', [
    (lambda: _policy(reward=_raises), {},
     'the reward function _raises raised ValueError: no score for this'),
    (lambda: _policy(reward=lambda p, r: 'good'), {}, "returned 'good'; it must return a float"),
    (lambda: _policy(), {'prompt_length': 6},
     r"a prompt of \d+ tokens is longer than TASK_FEATURE_LENGTHS\['inputs'\] = 6"),
    (lambda: _policy(samples=1), {}, 'grpo compares the responses to one prompt'),
    (lambda: _policy('t5', 'ppo', samples=1), {}, 'PPO value head reads a decoder-only'),
    (lambda: _policy(reward=None), {}, 'an RL run needs a reward'),
])
def test_bad_input_is_one_line_and_writes_no_checkpoint(make, kwargs, message, tmp_path):
  with pytest.raises(UserError, match=message):
    _train(make(), str(tmp_path), 2, **kwargs)
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '1'))


def test_an_empty_prompt_set_is_one_line(tmp_path):
  name = 'rl_test_empty_prompts'
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=sources.FunctionSource(
            dataset_fn=lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                {'inputs': tf.constant([], tf.string)}), splits=('train',)),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={'inputs': seqio.Feature(seqio.ByteVocabulary(), add_eos=False)},
        metric_fns=[])
  with pytest.raises(UserError, match="'rl_test_empty_prompts' has no examples in its 'train'"):
    _train(_policy(), str(tmp_path), 2, task=name)


@pytest.mark.parametrize('long_prompts,tokens,lengths', [
    ('error', [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]], [3, 8]),
    ('skip', [[5, 6, 7, 0, 0]], [3]),
    ('keep_end', [[5, 6, 7, 0, 0], [4, 5, 6, 7, 8]], [3, 5]),
])
def test_long_prompts_stop_skip_or_keep_their_end(long_prompts, tokens, lengths):
  from t5x_lite.data import feature_converters  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_generator(
      lambda: iter([{'inputs': np.int32([5, 6, 7])}, {'inputs': np.int32([1, 2, 3, 4, 5, 6, 7, 8])}]),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32)})
  converter = feature_converters.PromptFeatureConverter(long_prompts=long_prompts)
  rows = list(converter(ds, {'inputs': 5}).as_numpy_iterator())
  assert [r['prompt_tokens'].tolist() for r in rows] == tokens
  assert [int(r['prompt_length']) for r in rows] == lengths


def test_a_lora_policy_trains_its_adapters_over_the_frozen_reference(tmp_path):
  """GRPO of LoRA adapters around the tiny GPT policy: the reward rises, the
  checkpoints hold the adapters only (the base, which is also the reference,
  comes from the init at every start)."""
  from t5x_lite import lora  # pylint: disable=g-import-not-at-top
  # A base whose logits adapters can move: at the default initializer_range
  # (0.02) the frozen tied embeddings keep every logit within about ±0.1.
  base = policy.PolicyModel(
      decoder.DecoderModel(_gpt_config(initializer_range=0.5)), algorithm='grpo',
      rollout=policy.RolloutConfig(samples_per_prompt=4, max_response_length=8, epochs=2,
                                   num_minibatches=2), reward=VOWELS, kl_coef=0.01)
  model = lora.LoraModel(base, lora.LoraConfig(
      targets=('query', 'key', 'value', 'out', 'wi', 'wo'), rank=8, alpha=16.0))
  rows = _train(model, str(tmp_path), 25, lr=1e-2)
  rewards_ = [r['reward_mean'] for r in rows]
  assert rewards_[0] <= 0.2 and max(rewards_) >= 0.6, rewards_
  assert rows[0]['kl'] == pytest.approx(0.0, abs=1e-4)
  state = ocp.PyTreeCheckpointer().restore(os.path.join(tmp_path, 'checkpoints', '25', 'state'))
  assert set(state) == {'step', 'params', 'opt_state', 'rng'}
  leaves = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state['params'])[0]}
  assert leaves == {'lora_a', 'lora_b'}


def test_a_lora_policy_refuses_an_adaptive_kl():
  from t5x_lite import lora  # pylint: disable=g-import-not-at-top
  model = lora.LoraModel(_policy('gpt', 'ppo', samples=1, kl_target=1.0))
  with pytest.raises(UserError, match='a LoRA policy keeps KL_COEF fixed'):
    _train(model, '/nonexistent/never_written', 1)
