"""Cross-entropy, z-loss and label smoothing against hand-written numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import losses


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_reference(logits, targets, weights, z_loss, label_smoothing):
  """Dense soft-target cross entropy, written the long way."""
  v = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (v - 1)
  soft = np.full(logits.shape, low)
  np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
  const = -(confidence * np.log(confidence) +
            (v - 1) * low * np.log(low + 1e-20))
  lse = np.log(np.exp(logits).sum(-1))
  ce = -(soft * np_log_softmax(logits)).sum(-1) - const
  zl = z_loss * lse**2
  return ((ce + zl) * weights).sum(), (zl * weights).sum(), weights.sum()


LOGITS = np.array([[[1.0, 2.0, 3.0, 0.5], [0.0, -1.0, 2.0, 1.0],
                    [3.0, 3.0, 0.0, -2.0]]], np.float32)
TARGETS = np.array([[2, 0, 1]], np.int32)
WEIGHTS = np.array([[1.0, 0.5, 0.0]], np.float32)


def test_plain_cross_entropy_by_hand():
  total, z, w = losses.cross_entropy_with_logits(LOGITS, TARGETS, WEIGHTS)
  lp = np_log_softmax(LOGITS.astype(np.float64))
  expected = -(lp[0, 0, 2] * 1.0 + lp[0, 1, 0] * 0.5)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert float(z) == 0.0
  assert float(w) == 1.5


@pytest.mark.parametrize('z_loss,label_smoothing',
                         [(0.0, 0.0), (1e-4, 0.0), (0.1, 0.0), (0.0, 0.1),
                          (1e-2, 0.2)])
def test_matches_dense_reference(z_loss, label_smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
  weights = rng.uniform(size=(2, 5)).astype(np.float32)
  got = losses.cross_entropy_with_logits(logits, targets, weights, z_loss,
                                         label_smoothing)
  want = np_reference(logits.astype(np.float64), targets, weights, z_loss,
                      label_smoothing)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5)


@pytest.mark.parametrize('z_loss,label_smoothing', [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1), (1e-2, 0.2)])
def test_gradient_matches_autodiff_of_dense_reference(z_loss, label_smoothing):
  """The hand-written backward pass equals autodiff of the soft-target formula,
  for a cotangent on the loss and one on the reported z-loss."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
  g_loss, g_z = (jnp.asarray(rng.uniform(size=(2, 5)), jnp.float32) for _ in range(2))
  v = logits.shape[-1]
  soft = jax.nn.one_hot(targets, v) * (1 - label_smoothing - label_smoothing / (v - 1))
  soft = soft + label_smoothing / (v - 1)

  def dense(x):
    lse = jax.nn.logsumexp(x, axis=-1)
    zl = z_loss * lse**2
    return jnp.sum(g_loss * (-(soft * jax.nn.log_softmax(x)).sum(-1) + zl) + g_z * zl)

  def ours(x):
    loss, zl = losses.token_cross_entropy(x, targets, z_loss, label_smoothing)
    return jnp.sum(g_loss * loss + g_z * zl)

  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(dense)(logits), atol=1e-6)


def test_z_loss_is_part_of_total():
  no_z, _, _ = losses.cross_entropy_with_logits(LOGITS, TARGETS, WEIGHTS)
  total, z, _ = losses.cross_entropy_with_logits(LOGITS, TARGETS, WEIGHTS,
                                                 z_loss=0.5)
  lse = np.log(np.exp(LOGITS.astype(np.float64)).sum(-1))[0]
  np.testing.assert_allclose(z, 0.5 * (lse[0]**2 + 0.5 * lse[1]**2), rtol=1e-6)
  np.testing.assert_allclose(total, no_z + z, rtol=1e-6)


def test_label_smoothing_perfect_soft_fit_is_zero():
  # Logits whose softmax equals the smoothed target distribution give 0 loss.
  v, s = 5, 0.1
  probs = np.full(v, s / (v - 1))
  probs[3] = 1 - s
  logits = np.log(probs)[None, None].astype(np.float32)
  total, _, _ = losses.cross_entropy_with_logits(
      logits, np.array([[3]]), label_smoothing=s)
  np.testing.assert_allclose(total, 0.0, atol=1e-6)


def test_bfloat16_logits_computed_in_float32():
  total, z, w = losses.cross_entropy_with_logits(
      jnp.asarray(LOGITS, jnp.bfloat16), TARGETS, WEIGHTS, z_loss=1e-4)
  assert total.dtype == z.dtype == w.dtype == jnp.float32
  ref, _, _ = losses.cross_entropy_with_logits(LOGITS, TARGETS, WEIGHTS,
                                               z_loss=1e-4)
  np.testing.assert_allclose(total, ref, rtol=1e-2)


def test_no_weights_means_all_ones():
  total, _, w = losses.cross_entropy_with_logits(LOGITS, TARGETS)
  assert float(w) == 3.0
  lp = np_log_softmax(LOGITS.astype(np.float64))[0]
  np.testing.assert_allclose(total, -(lp[0, 2] + lp[1, 0] + lp[2, 1]),
                             rtol=1e-6)


def test_log_softmax_at_targets_and_accuracy():
  got = losses.log_softmax_at_targets(LOGITS, TARGETS)
  lp = np_log_softmax(LOGITS.astype(np.float64))[0]
  np.testing.assert_allclose(got[0], [lp[0, 2], lp[1, 0], lp[2, 1]], rtol=1e-6)
  # argmax: 2 (correct), 2 (wrong), 0 (tie -> first; wrong).
  correct, w = losses.weighted_accuracy(LOGITS, TARGETS, WEIGHTS)
  assert float(correct) == 1.0 and float(w) == 1.5
