"""Optimizers and learning-rate schedules, as plain makers that gin can bind."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """T5's schedule: base / sqrt(max(step, warmup)); constant during warm-up.

  With the defaults this is 0.01 for the first 10k steps, then 1/sqrt(step).
  """
  def schedule(step):
    return base_learning_rate / jnp.sqrt(jnp.maximum(step, warmup_steps).astype(jnp.float32))
  return schedule


def linear_warmup_decay_schedule(peak_learning_rate: float, warmup_steps: int,
                                 total_steps: int, end_learning_rate: float = 0.0) -> Schedule:
  """Linear warm-up to the peak, then linear decay (BERT's schedule)."""
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_learning_rate, warmup_steps),
       optax.linear_schedule(peak_learning_rate, end_learning_rate,
                             max(total_steps - warmup_steps, 1))],
      [warmup_steps])


def with_learning_rate_in_state(make: Callable[[Schedule | float], optax.GradientTransformation],
                                learning_rate: Schedule | float) -> optax.GradientTransformation:
  """Keeps the learning rate of each step in the optimizer state, for logging."""
  return optax.inject_hyperparams(make)(learning_rate=learning_rate)


def learning_rate(opt_state) -> jnp.ndarray:
  """The learning rate the last update used (see with_learning_rate_in_state)."""
  return opt_state.hyperparams['learning_rate']


def adafactor(learning_rate: Schedule | float = rsqrt_schedule(),
              decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True,
              momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None) -> optax.GradientTransformation:
  """Adafactor as T5 trained with it (factored second moments, no momentum)."""
  return with_learning_rate_in_state(lambda learning_rate: optax.adafactor(
      learning_rate=learning_rate, decay_rate=decay_rate,
      clipping_threshold=clipping_threshold,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      momentum=momentum, weight_decay_rate=weight_decay_rate), learning_rate)


def _matrices(params):
  """Weight decay mask: kernels and embeddings, not biases or norm scales (the
  leading axis of a scanned stack, under a 'layers' key, does not count)."""
  def is_matrix(path, p):
    stacked = any(getattr(k, 'key', None) == 'layers' for k in path)
    return p.ndim - stacked > 1
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def adamw(learning_rate: Schedule | float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-6, weight_decay: float = 0.01,
          max_grad_norm: Optional[float] = 1.0) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping (BERT's optimizer). As BERT,
  biases and LayerNorm parameters are not decayed."""
  def make(learning_rate):
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=_matrices)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx) if max_grad_norm else tx
  return with_learning_rate_in_state(make, learning_rate)
