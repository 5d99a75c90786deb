"""One GRPO iteration of a tiny GPT on 8 fake devices (data 2 x fsdp 2 x model 2):
the same samples, rewards and metrics as on one device, and the same policy
after its updates."""

import jax
import numpy as np
import pytest
import seqio

from t5x_lite import optimizers
from t5x_lite import rewards
from t5x_lite import rollouts
from t5x_lite.models import decoder
from t5x_lite.models import policy
from t5x_lite.partitioning import Partitioner

MODEL = policy.PolicyModel(
    decoder.DecoderModel(decoder.GPTConfig(
        vocab_size=384, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=2,
        max_positions=32, dropout_rate=0.0, attention_dropout_rate=0.0)),
    algorithm='grpo', reward=rewards.CharacterSetFraction('aeiou'), kl_coef=0.01,
    rollout=policy.RolloutConfig(samples_per_prompt=4, max_response_length=8, epochs=2,
                                 num_minibatches=2))


def _iteration(partitioner):
  vocabulary = seqio.ByteVocabulary()
  prompts = ['bcd', 'xyz12', 'k', 'mnpqrst', 'ggg', '90', 'hjk', 'lmn']
  ids = [vocabulary.encode(p) for p in prompts]
  batch = {'prompt_tokens': np.array([i + [0] * (8 - len(i)) for i in ids], np.int32),
           'prompt_length': np.array([len(i) for i in ids], np.int32)}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  trainer = rollouts.RolloutTrainer(MODEL, optimizers.adamw(3e-3, weight_decay=0.0),
                                    partitioner, shapes, vocabulary=vocabulary)
  state = trainer.init_state(seed=0)
  state, metrics = trainer.train_step(state, partitioner.shard_batch(batch))
  return {k: float(v) for k, v in metrics.items() if 'second' not in k}, jax.device_get(state)


@pytest.fixture(scope='module')
def one_device():
  return _iteration(Partitioner((1, 1, 1), devices=jax.devices()[:1]))


def test_grpo_iteration_on_eight_devices_is_one_devices(one_device):
  metrics, state = one_device
  theirs_metrics, theirs = _iteration(Partitioner((2, 2, 2), rules='model_parallel'))
  assert theirs_metrics['reward_mean'] == metrics['reward_mean'] > 0  # the same samples
  assert theirs_metrics['response_length'] == metrics['response_length']
  for key, value in metrics.items():
    assert theirs_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  assert int(theirs.step) == int(state.step) == 1
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         theirs.params, state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, theirs.frozen, state.frozen)
