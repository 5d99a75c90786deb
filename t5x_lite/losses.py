"""Token cross-entropy with z-loss and label smoothing.

Labels are integer ids; no one-hot over the vocabulary is built. All math is
float32 whatever the dtype of the logits.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def log_softmax_at_targets(logits: Array, targets: Array) -> Array:
  """log p(target) per position: [B,T,V], [B,T] -> [B,T] float32."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - lse


def token_cross_entropy(logits: Array,
                        targets: Array,
                        z_loss: float = 0.0,
                        label_smoothing: float = 0.0) -> Tuple[Array, Array]:
  """Per-token loss and its z-loss part, both [B,T] float32.

  loss = -sum_v q_v log p_v - c + z_loss * logsumexp(logits)^2, where q puts
  `1 - label_smoothing` on the target and spreads the rest evenly over the
  other V-1 ids, and c is the entropy of q (so a perfect fit scores 0), as
  in T5X / Mesh TensorFlow. The z-loss term is included in `loss`.
  """
  logits = logits.astype(jnp.float32)
  vocab_size = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    normalizing_constant = -(
        confidence * np.log(confidence) +
        (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20))
    # sum_v q_v logits_v without materialising q.
    expected_logit = ((confidence - low_confidence) * target_logit +
                      low_confidence * jnp.sum(logits, axis=-1))
    loss = lse - expected_logit - normalizing_constant
  else:
    loss = lse - target_logit
  token_z_loss = z_loss * jnp.square(lse)
  return loss + token_z_loss, token_z_loss


def cross_entropy_with_logits(
    logits: Array,
    targets: Array,
    weights: Optional[Array] = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0) -> Tuple[Array, Array, Array]:
  """Weighted sums over all tokens.

  Args:
    logits: [B,T,V] (any float dtype).
    targets: [B,T] integer ids.
    weights: [B,T] loss weights; None means all ones.
    z_loss: coefficient of the log(Z)^2 auxiliary loss.
    label_smoothing: mass moved from the target to the other ids.

  Returns:
    (total_loss_sum, z_loss_sum, weight_sum), scalars in float32;
    `total_loss_sum` includes the z-loss.
  """
  loss, token_z_loss = token_cross_entropy(logits, targets, z_loss,
                                           label_smoothing)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  return (jnp.sum(loss * weights), jnp.sum(token_z_loss * weights),
          jnp.sum(weights))


def weighted_accuracy(logits: Array, targets: Array,
                      weights: Optional[Array] = None) -> Tuple[Array, Array]:
  """(sum of weights where the target has the largest logit, sum of weights).

  Compares the target's logit with the maximum (which the log-softmax also
  reduces to) instead of an argmax over the vocabulary; a tie for the
  maximum counts as correct.
  """
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)
