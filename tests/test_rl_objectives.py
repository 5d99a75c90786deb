"""PPO / GRPO / RLOO math against hand-worked numbers and numpy loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import rl_objectives as rl

# Row 0 ends (EOS) at t=1, row 1 at t=3; 99 marks what must be ignored.
MASK = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
REWARDS = np.array([[0.1, 1.0, 99.0, 99.0], [0.0, -0.2, 0.3, 2.0]], np.float32)
VALUES = np.array([[0.5, 0.4, 99.0, 99.0], [0.2, 0.1, -0.3, 0.6]], np.float32)


def np_gae(rewards, values, mask, gamma, lam):
  """The backward loop of the GAE paper, one row at a time."""
  advantages = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    length = int(mask[b].sum())
    next_adv = 0.0
    for t in reversed(range(length)):
      next_value = values[b, t + 1] if t + 1 < length else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_adv = advantages[b, t] = delta + gamma * lam * next_adv
  return advantages, np.where(mask > 0, advantages + values, 0.0)


def test_masked_sum_and_mean():
  x = np.array([[1.0, 2.0, np.inf], [4.0, 5.0, 6.0]], np.float32)
  mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
  assert rl.masked_sum(x, mask) == 3.0
  assert rl.masked_mean(x, mask) == 1.5
  np.testing.assert_allclose(rl.masked_mean(x, mask, axis=1), [1.5, 0.0])
  assert rl.masked_mean(x, np.zeros_like(mask)) == 0.0  # not NaN


def test_masked_whiten():
  x = np.random.RandomState(0).normal(3.0, 2.0, (3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.float32)
  real = x[mask > 0]
  out = np.asarray(rl.masked_whiten(x, mask))
  np.testing.assert_allclose(out[mask > 0], (real - real.mean()) / real.std(), rtol=1e-5)
  assert abs(out[mask > 0].mean()) < 1e-6 and abs(out[mask > 0].var() - 1) < 1e-5
  assert np.all(out[mask == 0] == 0)
  kept = np.asarray(rl.masked_whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask > 0], out[mask > 0] + real.mean(), rtol=1e-5)
  assert np.all(kept[mask == 0] == 0)


def test_kl_estimators():
  half, quarter = np.log(0.5), np.log(0.25)
  logps = np.array([half, quarter, -1.0, -1.01], np.float32)
  ref = np.array([quarter, half, -1.0, -1.0], np.float32)
  k1 = np.asarray(rl.kl_k1(logps, ref))
  k3 = np.asarray(rl.kl_k3(logps, ref))
  log2 = np.log(2.0)
  np.testing.assert_allclose(k1[:3], [log2, -log2, 0.0], atol=1e-6)
  # k3 = e^(ref - logp) - (ref - logp) - 1: 0.5 + log 2 - 1 and 2 - log 2 - 1.
  np.testing.assert_allclose(k3[:3], [log2 - 0.5, 1 - log2, 0.0], atol=1e-6)
  assert np.all(k3 >= 0) and k3[2] == 0.0
  np.testing.assert_allclose(k3[3], k1[3]**2 / 2, rtol=1e-2)  # 0.01 apart


def test_token_rewards_score_on_last_real_token():
  scores = np.array([2.0, 3.0, 5.0], np.float32)
  kl = np.array([[0.1, 0.2, 0.3, 0.4]] * 3, np.float32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  expected = [[-0.05, -0.1 + 2.0, 0, 0], [-0.05, -0.1, -0.15, -0.2 + 3.0], [0, 0, 0, 0]]
  np.testing.assert_allclose(rl.token_rewards(scores, kl, mask, 0.5), expected, atol=1e-6)
  traced = jax.jit(rl.token_rewards)(scores, kl, mask, jnp.float32(0.5))
  np.testing.assert_allclose(traced, expected, atol=1e-6)


def test_gae_rows_ending_at_different_steps():
  adv, ret = rl.gae(REWARDS, VALUES, MASK, 0.9, 0.8)
  want_adv, want_ret = np_gae(REWARDS, VALUES, MASK, 0.9, 0.8)
  np.testing.assert_allclose(adv, want_adv, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, atol=1e-6)
  # Row 0 by hand: delta_1 = 1.0 - 0.4 (no value after EOS) = A_1;
  # delta_0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04, A_0 = -0.04 + 0.72 * 0.6.
  np.testing.assert_allclose(adv[0], [0.392, 0.6, 0, 0], atol=1e-6)
  np.testing.assert_allclose(ret[0], [0.892, 1.0, 0, 0], atol=1e-6)
  # gamma = lam = 1: the advantage is the rest of the rewards minus V_t.
  adv, _ = rl.gae(REWARDS, VALUES, MASK, 1.0, 1.0)
  np.testing.assert_allclose(adv[1], [2.1 - 0.2, 2.1 - 0.1, 2.3 + 0.3, 2.0 - 0.6], atol=1e-6)


def test_group_advantages():
  rewards = np.array([1.0, 0.0, 0.0, 0.5, 1.5, 4.0], np.float32)
  groups = rewards.reshape(2, 3)
  want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(rl.group_advantages(rewards, 3, 'grpo'), want.ravel(), rtol=1e-5)
  loo = np.array([[g[i] - np.delete(g, i).mean() for i in range(3)] for g in groups])
  rloo = rl.group_advantages(rewards, 3, 'rloo')
  np.testing.assert_allclose(rloo, loo.ravel(), rtol=1e-6)
  np.testing.assert_allclose(rloo[:3], [1.0, -0.5, -0.5])  # 1 - 0, 0 - 1/2
  equal = rl.group_advantages(np.array([0.7, 0.7, 0.7, 0.0, 1.0, 2.0]), 3, 'grpo')
  np.testing.assert_array_equal(equal[:3], 0.0)
  np.testing.assert_allclose(equal[3:], np.array([-1.0, 0.0, 1.0]) / 1.0001, rtol=1e-6)
  for args in [(rewards, 3, 'ppo'), (rewards, 4, 'grpo'), (rewards, 1, 'rloo')]:
    with pytest.raises(ValueError):
      rl.group_advantages(*args)


# Ratios 1.1 (inside [0.8, 1.2]), 1.5 (above) and 0.5 (below), epsilon 0.2.
RATIOS = np.array([1.1, 1.5, 0.5], np.float32)


def test_clipped_policy_loss_positive_and_negative_advantages():
  logps = np.log(np.stack([RATIOS, RATIOS])) - 1.0
  old = np.full_like(logps, -1.0)
  loss, clipped, approx_kl = rl.clipped_policy_loss(logps, old, np.array([1.0, -1.0]), 0.2)
  # A = +1: max(-r, -clip(r)); A = -1: max(r, clip(r)).
  np.testing.assert_allclose(loss, [[-1.1, -1.2, -0.5], [1.1, 1.5, 0.8]], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[0, 1, 0], [0, 0, 1]])
  np.testing.assert_allclose(approx_kl, 0.5 * np.log(np.stack([RATIOS] * 2))**2, rtol=1e-5)
  per_token = rl.clipped_policy_loss(logps, old, np.array([[1.0] * 3, [-1.0] * 3]), 0.2)
  np.testing.assert_allclose(per_token[0], loss)


def test_clipped_policy_loss_gradient_is_zero_where_clipped():
  logps = jnp.log(jnp.stack([RATIOS, RATIOS]))
  adv = jnp.array([1.0, -1.0])
  grad = jax.grad(lambda lp: rl.clipped_policy_loss(lp, jnp.zeros_like(lp), adv, 0.2)[0].sum())
  # Where the clip is not active d(-A r)/d logp = -A r.
  np.testing.assert_allclose(grad(logps), [[-1.1, 0.0, -0.5], [1.1, 1.5, 0.0]], rtol=1e-6)


def test_clipped_value_loss():
  values = np.array([0.1, 0.5, -0.5, 0.5], np.float32)
  returns = np.array([1.0, 1.0, -1.0, 0.0], np.float32)
  loss, clipped = rl.clipped_value_loss(values, np.zeros(4, np.float32), returns, 0.2)
  # v 0.1: inside; v 0.5 -> 0.2: 0.64 > 0.25; v -0.5 -> -0.2: 0.64 > 0.25;
  # v 0.5 -> 0.2 against R 0: 0.04 < 0.25, the unclipped term is kept.
  np.testing.assert_allclose(loss, [0.405, 0.32, 0.32, 0.125], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [0, 1, 1, 0])


def test_entropy_from_logits():
  np.testing.assert_allclose(rl.entropy_from_logits(jnp.full((2, 7), 3.0)), [np.log(7)] * 2,
                             rtol=1e-6)
  logits = np.random.RandomState(1).normal(size=(3, 4, 11))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(rl.entropy_from_logits(logits.astype(np.float32)),
                             -(p * np.log(p)).sum(-1), rtol=1e-5)
  big = jnp.array([[1e4, 1e4, 0.0], [0.0, -jnp.inf, 0.0]], jnp.bfloat16)
  np.testing.assert_allclose(rl.entropy_from_logits(big), [np.log(2)] * 2, rtol=1e-6)


def test_explained_variance():
  returns = np.array([[1.0, 2.0, 3.0, 50.0]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  assert rl.explained_variance(returns, returns, mask) == pytest.approx(1.0)
  constant = rl.explained_variance(np.full_like(returns, 0.3), returns, mask)
  assert constant == pytest.approx(0.0, abs=1e-6)
  # residual [0, 0, 1]: variance 2/9 against the returns' 2/3.
  values = np.array([[1.0, 2.0, 2.0, -7.0]], np.float32)
  assert rl.explained_variance(values, returns, mask) == pytest.approx(2 / 3, rel=1e-5)
  assert rl.explained_variance(values, np.full_like(returns, 0.1), mask) == 0.0
  assert rl.explained_variance(values, returns, np.zeros_like(mask)) == 0.0


def test_adaptive_kl_coef():
  step = functools.partial(rl.adaptive_kl_coef, 0.2, target=6.0, horizon=10000.0, n_steps=256)
  assert float(step(kl=6.0)) == pytest.approx(0.2)
  assert float(step(kl=6.6)) == pytest.approx(0.2 * (1 + 0.1 * 256 / 10000))
  assert float(step(kl=600.0)) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
  assert float(step(kl=0.0)) == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))
  # n_steps == horizon: at most +-20 % in one update.
  assert float(rl.adaptive_kl_coef(0.1, 1e6, 1.0, 64, 64)) == pytest.approx(0.12)
  assert float(rl.adaptive_kl_coef(0.1, 0.0, 1.0, 64, 64)) == pytest.approx(0.08)
  jitted = jax.jit(rl.adaptive_kl_coef)(jnp.float32(0.1), jnp.float32(2.0), 1.0, 64.0, 32)
  assert float(jitted) == pytest.approx(0.11)


def test_everything_jits():
  logps = jnp.log(jnp.stack([RATIOS, RATIOS]))
  x = jnp.asarray(VALUES)
  cases = [
      (rl.masked_sum, (x, MASK)), (rl.masked_mean, (x, MASK)), (rl.masked_whiten, (x, MASK)),
      (rl.kl_k1, (logps, x[:, :3])), (rl.kl_k3, (logps, x[:, :3])),
      (rl.token_rewards, (jnp.ones(2), x, MASK, 0.1)),
      (rl.gae, (jnp.asarray(REWARDS), x, MASK, 0.9, 0.8)),
      (functools.partial(rl.group_advantages, group_size=3, kind='grpo'), (jnp.arange(6.0),)),
      (functools.partial(rl.group_advantages, group_size=3, kind='rloo'), (jnp.arange(6.0),)),
      (rl.clipped_policy_loss, (logps, jnp.zeros_like(logps), jnp.ones(2), 0.2)),
      (rl.clipped_value_loss, (x, x + 0.3, x - 1.0, 0.2)),
      (rl.entropy_from_logits, (x,)), (rl.explained_variance, (x, jnp.asarray(REWARDS), MASK)),
      (rl.adaptive_kl_coef, (0.2, 7.0, 6.0, 100.0, 10)),
  ]
  for fn, args in cases:
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    jax.tree_util.tree_map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), jitted, eager)
