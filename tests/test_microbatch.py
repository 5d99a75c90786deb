"""Gradient accumulation (NUM_MICROBATCHES): k microbatches give the loss,
metrics and parameters of the one-batch step, for every kind of loss and DPO."""

import jax
import numpy as np
import optax
import pytest

from t5x_lite import optimizers
from t5x_lite import trainer as trainer_lib
from t5x_lite.errors import UserError
from t5x_lite.models import preference
from t5x_lite.partitioning import Partitioner

import families

ROWS = 8
STEPS = 3


def _dpo_batch(model):
  """A preference batch: the same random rows as chosen and, shifted, as rejected."""
  one = families.random_batch(model, ROWS)
  other = families.random_batch(model, ROWS, seed=1)
  return {**{f'chosen_{k}': v for k, v in one.items()},
          **{f'rejected_{k}': v for k, v in other.items()}}


def _train(model, batch, k):
  shapes = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in batch.items()}
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-3), Partitioner(), shapes,
                                num_microbatches=k)
  state = trainer.init_state(seed=0)
  if state.frozen:  # DPO: a reference unlike the policy, or every margin starts as rounding noise
    state = state.replace(frozen=jax.tree_util.tree_map(lambda x: 0.9 * x, state.frozen))
  history = []
  for _ in range(STEPS):
    state, metrics = trainer.train_step(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history


# One family per loss and batch layout: BART has T5's (TokenLossModel on an
# encoder-decoder batch), so it would take the same path again.
@pytest.mark.parametrize('family', ['t5', 'bert', 'gpt', 'gpt_cls', 'dpo'])
def test_microbatches_equal_the_whole_batch(family):
  if family == 'dpo':
    model = preference.DPOModel(families.tiny('gpt'), beta=0.5)
    batch = _dpo_batch(model.model)
  else:
    model = families.tiny(family)
    batch = families.random_batch(model, ROWS)
  want_params, want = _train(model, batch, 1)
  for k in (4,):
    params, got = _train(model, batch, k)
    for step, (g, w) in enumerate(zip(got, want)):
      assert sorted(g) == sorted(w)
      for name in w:
        # DPO's rewards are differences of log-probs some 1e3 times larger:
        # their rounding is absolute, not relative to the small difference.
        atol = 1e-7 if name == 'loss' else 1e-6
        np.testing.assert_allclose(g[name], w[name], rtol=1e-6, atol=atol,
                                   err_msg=f'k={k} step {step} {name}')
    # Relative to the norm of all params: a param whose gradient is exactly
    # zero (a key bias under softmax) gets Adam updates of pure rounding noise.
    diff = optax.tree.norm(jax.tree_util.tree_map(np.subtract, params, want_params))
    assert diff <= 1e-6 * optax.tree.norm(want_params), (k, diff)


def test_the_rows_of_a_microbatch_differ_in_padding():
  """The equality above would hold by accident if every microbatch had as
  many loss tokens as every other; it does not."""
  batch = families.random_batch(families.tiny('gpt'), ROWS)
  tokens = batch['decoder_loss_weights'].reshape(ROWS // 4, 4, -1).sum(axis=(0, 2))
  assert len(set(tokens.tolist())) > 1


def test_a_batch_that_does_not_split_is_one_line():
  model = families.tiny('gpt')
  batch = families.random_batch(model, 6)
  shapes = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in batch.items()}
  with pytest.raises(UserError, match='NUM_MICROBATCHES=4 .* divisor of 6'):
    trainer_lib.Trainer(model, optimizers.adamw(1e-3), Partitioner(), shapes, num_microbatches=4)
