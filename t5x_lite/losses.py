"""Token cross-entropy with z-loss and label smoothing; the DPO and reward-model
pair losses.

Labels are integer ids; no one-hot over the vocabulary is built. All math is
float32 whatever the dtype of the logits.
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def log_softmax_at_targets(logits: Array, targets: Array) -> Array:
  """log p(target) per position: [B,T,V], [B,T] -> [B,T] float32.

  Shifted by the maximum first, so that a near-certain target keeps its small
  log-probability's precision.
  """
  logits = logits.astype(jnp.float32)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  target = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
  return target - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def _smoothing(vocab_size: int, label_smoothing: float) -> Tuple[float, float, float]:
  """(target mass, mass of every other id, entropy of that distribution)."""
  if not label_smoothing:
    return 1.0, 0.0, 0.0
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab_size - 1)
  entropy = -(confidence * np.log(confidence) +
              (vocab_size - 1) * low * np.log(low + 1e-20))
  return confidence, low, float(entropy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy(logits: Array, targets: Array, z_loss: float,
                   label_smoothing: float) -> Tuple[Array, Array]:
  return _cross_entropy_fwd(logits, targets, z_loss, label_smoothing)[0]


@jax.named_scope('cross_entropy')
def _cross_entropy_fwd(logits, targets, z_loss, label_smoothing):
  confidence, low, entropy = _smoothing(logits.shape[-1], label_smoothing)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  exp = jnp.exp(shifted)
  total = jnp.sum(exp, axis=-1, keepdims=True)
  lse = jnp.log(total)  # of the shifted logits: differences below are exact
  target = jnp.take_along_axis(shifted, targets[..., None], axis=-1)
  expected = (confidence - low) * target
  if low:
    expected = expected + low * jnp.sum(shifted, axis=-1, keepdims=True)
  full_lse = lse + (logits - shifted)[..., :1]
  token_z_loss = z_loss * jnp.square(full_lse)
  loss = lse - expected - entropy + token_z_loss
  probs = exp / total
  return (loss[..., 0], token_z_loss[..., 0]), (probs, full_lse, targets)


@jax.named_scope('cross_entropy')
def _cross_entropy_bwd(z_loss, label_smoothing, residuals, cotangents):
  probs, full_lse, targets = residuals
  g_loss, g_z = (g[..., None] for g in cotangents)
  confidence, low, _ = _smoothing(probs.shape[-1], label_smoothing)
  # d lse = probs; d z*lse^2 = 2 z lse probs; d expected = (c - low) onehot + low.
  scale = g_loss + 2.0 * z_loss * full_lse * (g_loss + g_z)
  grad = probs * scale - g_loss * low
  onehot = jnp.arange(probs.shape[-1]) == targets[..., None]
  grad = grad - jnp.where(onehot, g_loss * (confidence - low), 0.0)
  return grad, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_cross_entropy(logits: Array,
                        targets: Array,
                        z_loss: float = 0.0,
                        label_smoothing: float = 0.0) -> Tuple[Array, Array]:
  """Per-token loss and its z-loss part, both [B,T] float32.

  loss = -sum_v q_v log p_v - c + z_loss * logsumexp(logits)^2, where q puts
  `1 - label_smoothing` on the target and spreads the rest evenly over the
  other V-1 ids, and c is the entropy of q (so a perfect fit scores 0), as
  in T5X / Mesh TensorFlow. The z-loss term is included in `loss`.

  One pass over the vocabulary computes the loss and keeps the softmax for
  the backward pass, whose gradient (softmax scaled for the z-loss, minus q)
  is written directly: no one-hot matrix, no second exponential.
  """
  return _cross_entropy(logits.astype(jnp.float32), targets, float(z_loss),
                        float(label_smoothing))


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
  with jax.named_scope('accuracy'):
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)


DPO_LOSS_TYPES = ('sigmoid', 'ipo')


def dpo_loss(policy_chosen: Array, policy_rejected: Array,
             reference_chosen: Array, reference_rejected: Array,
             beta: float = 0.1, loss_type: str = 'sigmoid',
             label_smoothing: float = 0.0) -> Tuple[Array, Array, Array]:
  """Preference losses of pairs from their sequence log-probs, all [B].

  With h = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)):

    'sigmoid'  DPO (Rafailov et al. 2023): -log σ(β h); with
               `label_smoothing` ε > 0 the conservative DPO of a preference
               label flipped with probability ε:
               -(1 - ε) log σ(β h) - ε log σ(-β h).
    'ipo'      IPO (Azar et al. 2023): (h - 1 / (2β))², on the sequence
               log-ratios as in the paper.

  Returns (losses, chosen rewards, rejected rewards); a reward is
  β (log π(y) - log π_ref(y)), without gradient.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f'loss_type={loss_type!r} is unknown; use one of {DPO_LOSS_TYPES}.')
  chosen_ratio = policy_chosen - reference_chosen
  rejected_ratio = policy_rejected - reference_rejected
  h = chosen_ratio - rejected_ratio
  if loss_type == 'ipo':
    pair_losses = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    pair_losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                   - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  rewards = jax.lax.stop_gradient(beta * jnp.stack([chosen_ratio, rejected_ratio]))
  return pair_losses, rewards[0], rewards[1]


def bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array,
                       margin: Array | float = 0.0,
                       center_rewards_coefficient: float = 0.0) -> Array:
  """[B] reward-model losses of pairs from their scalar rewards, all [B].

  The Bradley–Terry negative log-likelihood of the preference,
  -log σ(r_c - r_r - m), with a margin m (Llama 2: larger for more clearly
  preferred pairs; a scalar or [B]), plus the reward centring term
  c (r_c + r_r)² (TRL's `center_rewards_coefficient`), which pins the
  rewards' free offset near zero.
  """
  chosen = jnp.asarray(chosen_rewards, jnp.float32)
  rejected = jnp.asarray(rejected_rewards, jnp.float32)
  pair_losses = -jax.nn.log_sigmoid(chosen - rejected - jnp.asarray(margin, jnp.float32))
  if center_rewards_coefficient:
    pair_losses = pair_losses + center_rewards_coefficient * jnp.square(chosen + rejected)
  return pair_losses
