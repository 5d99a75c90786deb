"""The math of RLHF policy optimisation: PPO, GRPO and RLOO.

Every array is in response coordinates: [B, T], T the response length, with a
float `mask` [B, T] that is 1.0 on the response's real tokens (EOS included)
and 0.0 after. All functions are plain jax.numpy, float32 and jittable.

- masked_sum, masked_mean, masked_whiten: reductions over the real tokens;
  masked_whiten is TRL's `whiten` (normalises PPO's advantages).
- kl_k1, kl_k3: per-token estimators of KL(policy || reference) from sampled
  log-probabilities (Schulman, "Approximating KL Divergence"); k1 is the plain
  log-ratio in PPO's reward (InstructGPT, Ouyang et al.), k3 the unbiased,
  non-negative one of GRPO's loss (DeepSeekMath, Shao et al.).
- token_rewards: PPO's per-token reward, -kl_coef * KL at every token plus the
  reward model's score at the last one (Ziegler et al., "Fine-Tuning Language
  Models from Human Preferences"; TRL's PPOTrainer).
- gae: generalized advantage estimation (Schulman et al., "High-Dimensional
  Continuous Control Using Generalized Advantage Estimation"), as in TRL.
- group_advantages: the critic-free advantages of a group of answers to one
  prompt: GRPO's group-normalised reward (DeepSeekMath; TRL's GRPOTrainer) or
  RLOO's leave-one-out baseline (Ahmadian et al., "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs").
- clipped_policy_loss, clipped_value_loss: PPO's clipped surrogate objectives
  (Schulman et al., "Proximal Policy Optimization Algorithms"), per token, with
  TRL's clip fractions and approximate KL.
- entropy_from_logits: the policy's entropy per position.
- explained_variance: how much of the returns' variance the value head explains.
- adaptive_kl_coef: the adaptive KL controller of Ziegler et al. (TRL's
  AdaptiveKLController).
"""

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Union[float, Array]


def masked_sum(x: Array, mask: Array, axis: Optional[int] = None) -> Array:
  """Sum of x * mask (positions where mask is 0 count as 0, even if not finite)."""
  x = jnp.asarray(x, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: Optional[int] = None) -> Array:
  """masked_sum / max(sum(mask), 1): an all-0 mask gives 0, never NaN."""
  mask = jnp.asarray(mask, jnp.float32)
  count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)), axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> Array:
  """(x - mean) / sqrt(var + eps) over the masked elements; 0 where mask is 0.

  var is the population variance (the masked mean of squared deviations). With
  shift_mean=False the mean is added back (TRL's `whiten`).
  """
  x = jnp.asarray(x, jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(jnp.asarray(mask) != 0, whitened, 0.0)


def kl_k1(logps: Array, ref_logps: Array) -> Array:
  """k1 = log p - log p_ref per token: unbiased, but negative at some tokens."""
  return jnp.asarray(logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)


def kl_k3(logps: Array, ref_logps: Array) -> Array:
  """k3 = exp(ref - logp) - (ref - logp) - 1 per token: unbiased and >= 0."""
  log_ratio = jnp.asarray(ref_logps, jnp.float32) - jnp.asarray(logps, jnp.float32)
  return jnp.expm1(log_ratio) - log_ratio


def _last_token(mask: Array) -> Array:
  """[B, T] 1.0 at each row's last real token (none in a row without one)."""
  real = jnp.asarray(mask) != 0
  t = real.shape[-1]
  last = t - 1 - jnp.argmax(real[:, ::-1], axis=-1)
  onehot = jnp.arange(t)[None, :] == last[:, None]
  return (onehot & jnp.any(real, axis=-1, keepdims=True)).astype(jnp.float32)


def token_rewards(scores: Array, kl: Array, mask: Array, kl_coef: Scalar) -> Array:
  """PPO's per-token reward [B, T]: -kl_coef * kl at every real token, plus the
  score [B] at each row's last real token; 0 where mask is 0."""
  penalty = -jnp.asarray(kl_coef, jnp.float32) * jnp.asarray(kl, jnp.float32)
  rewards = jnp.where(jnp.asarray(mask) != 0, penalty, 0.0)
  return rewards + _last_token(mask) * jnp.asarray(scores, jnp.float32)[:, None]


def gae(rewards: Array, values: Array, mask: Array, gamma: Scalar,
        lam: Scalar) -> Tuple[Array, Array]:
  """Generalized advantage estimation: (advantages [B, T], returns [B, T]).

  delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, where
  V_{t+1} and A_{t+1} are 0 past a row's last real token (the episode ends at
  EOS; values at masked positions are ignored). returns = advantages + values.
  Both are 0 where mask is 0. The mask of a row is a prefix of real tokens.
  """
  real = jnp.asarray(mask) != 0
  rewards = jnp.where(real, jnp.asarray(rewards, jnp.float32), 0.0)
  values = jnp.where(real, jnp.asarray(values, jnp.float32), 0.0)
  gamma = jnp.asarray(gamma, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = jnp.where(m, delta + gamma * lam * next_adv, 0.0)
    return (v, adv), adv  # v is already 0 at masked positions

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, real.T),
                        reverse=True)
  advantages = adv.T
  returns = jnp.where(real, advantages + values, 0.0)
  return advantages, returns


def group_advantages(rewards: Array, group_size: int, kind: str,
                     eps: float = 1e-4) -> Array:
  """Advantages [N] of N = groups * group_size answers, grouped consecutively.

  'grpo': (r - group mean) / (group std + eps), std unbiased (ddof=1, as
  torch.std in TRL's GRPOTrainer); a group of equal rewards gives 0.
  'rloo': r - (group sum - r) / (G - 1), the mean of the other answers.
  """
  if kind not in ('grpo', 'rloo'):
    raise ValueError(f"kind must be 'grpo' or 'rloo', not {kind!r}")
  if group_size < 2:
    raise ValueError(f'group_size must be at least 2, not {group_size}')
  rewards = jnp.asarray(rewards, jnp.float32)
  n = rewards.shape[0]
  if rewards.ndim != 1 or n % group_size:
    raise ValueError(f'rewards of shape {rewards.shape} do not split into groups '
                     f'of {group_size}')
  groups = rewards.reshape(n // group_size, group_size)
  if kind == 'grpo':
    mean = jnp.mean(groups, axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    advantages = (groups - mean) / (std + eps)
  else:
    others = jnp.sum(groups, axis=1, keepdims=True) - groups
    advantages = groups - others / (group_size - 1)
  return advantages.reshape(n)


def clipped_policy_loss(logps: Array, old_logps: Array, advantages: Array,
                        epsilon: Scalar) -> Tuple[Array, Array, Array]:
  """PPO's clipped surrogate per token: (loss, clipped, approx_kl), each [B, T].

  ratio = exp(logps - old_logps); loss = max(-A ratio, -A clip(ratio, 1 - eps,
  1 + eps)); clipped is 1.0 where the clipped term is strictly larger (TRL's
  clipfrac); approx_kl = (logps - old_logps)^2 / 2. advantages are [B, T] or
  [B] (one per row). Nothing is masked: the caller averages over the mask.
  """
  log_ratio = jnp.asarray(logps, jnp.float32) - jnp.asarray(old_logps, jnp.float32)
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == log_ratio.ndim - 1:
    advantages = advantages[..., None]
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped_term = -advantages * jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
  loss = jnp.maximum(unclipped, clipped_term)
  clipped = (clipped_term > unclipped).astype(jnp.float32)
  return loss, clipped, 0.5 * jnp.square(log_ratio)


def clipped_value_loss(values: Array, old_values: Array, returns: Array,
                       epsilon: Scalar) -> Tuple[Array, Array]:
  """PPO's clipped value loss per token: (loss, clipped), each [B, T].

  loss = max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2) / 2; clipped is
  1.0 where the second is strictly larger. Nothing is masked.
  """
  values = jnp.asarray(values, jnp.float32)
  old_values = jnp.asarray(old_values, jnp.float32)
  returns = jnp.asarray(returns, jnp.float32)
  unclipped = jnp.square(values - returns)
  v_clipped = jnp.clip(values, old_values - epsilon, old_values + epsilon)
  clipped_term = jnp.square(v_clipped - returns)
  loss = 0.5 * jnp.maximum(unclipped, clipped_term)
  return loss, (clipped_term > unclipped).astype(jnp.float32)


def entropy_from_logits(logits: Array) -> Array:
  """Entropy [...] of softmax(logits [..., V]): logsumexp(l) - sum softmax(l) l.

  float32, on logits shifted by their maximum; -inf logits (ids ruled out)
  contribute 0.
  """
  logits = jnp.asarray(logits, jnp.float32)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  exp = jnp.exp(shifted)
  total = jnp.sum(exp, axis=-1)
  probs = exp / total[..., None]
  expected = jnp.sum(jnp.where(probs > 0, probs * shifted, 0.0), axis=-1)
  return jnp.log(total) - expected


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - var(returns - values) / var(returns) over the masked elements.

  Population variances; 0.0 where the returns do not vary (up to float32
  rounding of their mean), never NaN.
  """
  returns = jnp.asarray(returns, jnp.float32)
  residual = returns - jnp.asarray(values, jnp.float32)

  def variance(x):
    return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)

  var_returns = variance(returns)
  flat = var_returns <= 1e-12 * jnp.square(masked_mean(returns, mask))
  ratio = variance(residual) / jnp.where(flat, 1.0, var_returns)
  return jnp.where(flat, 0.0, 1.0 - ratio)


def adaptive_kl_coef(coef: Scalar, kl: Scalar, target: Scalar, horizon: Scalar,
                     n_steps: Scalar) -> Array:
  """The next KL coefficient of the adaptive controller (Ziegler et al.):
  coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)."""
  error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  return jnp.asarray(coef, jnp.float32) * (1.0 + error * n_steps / horizon)
