"""Kernels for XLA's CPU backend: the plain contractions with hand-written
gradients, and attention in the layout they favour.

XLA:CPU runs a contraction over both operands' major axis (the weight
gradient of a dense layer, the key and value gradients of attention) through
transposed copies that cost more than the product itself, and the sum of a
broadcast's gradient about 40x slower than the same sum as a contraction. So
here:
  - every contraction is one (batched) 2-D matrix product, `product` or
    `scores`, whose backward pass transposes the smaller operand as an
    explicit copy first (`_major_contract`);
  - keys and values are kept heads-major, [B,N,S,H], the layout `scores` and
    `product` contract in, so a KV cache is read in place at every decoding
    step;
  - a position bias shared over the batch is broadcast by `expand_batch`,
    whose gradient is a contraction with ones.

`jax.lax.optimization_barrier` keeps XLA from folding the copies back into
the products. Other backends pay for the copies and lose fusion across the
barriers, which is why these kernels are used only where `t5x_lite.ops`
chooses them (CPU). Values and gradients equal the plain path's
(tests/test_ops.py).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Keys and values (and the KV cache) are heads-major.
KV_LAYOUT = 'BNSH'

# Logit of a masked position: finite, so that a fully masked row gives a
# uniform softmax instead of NaN (as jax.nn.dot_product_attention does).
MASK_LOGIT = -1e10


def _swap(x: Array) -> Array:
  """x with its last two axes swapped, as a materialised copy."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _major_contract(a: Array, g: Array) -> Array:
  """a^T g, [..., T, S] x [..., T, H] -> [..., S, H]: a product's gradient form.

  The smaller of a and g is transposed as a copy first: (a^T) g, or (g^T a)^T.
  """
  if a.shape[-1] <= g.shape[-1]:
    return jax.lax.optimization_barrier(_swap(a) @ g)
  return _swap(jax.lax.optimization_barrier(_swap(g) @ a))


@jax.custom_vjp
def product(a: Array, b: Array) -> Array:
  """a @ b, [..., T, S] x [..., S, H] -> [..., T, H], with b's gradient by `_major_contract`."""
  return a @ b


def _product_fwd(a, b):
  return product(a, b), (a, b)


def _product_bwd(residuals, g):
  a, b = residuals
  return ((g @ jnp.swapaxes(b, -1, -2)).astype(a.dtype),
          _major_contract(a, g).astype(b.dtype))


product.defvjp(_product_fwd, _product_bwd)


@jax.custom_vjp
def scores(q: Array, k: Array) -> Array:
  """q k^T, [..., T, H] x [..., S, H] -> [..., T, S], with k's gradient by `_major_contract`.

  Not `product(q, k^T)`: that would copy k^T at every decoding step, a whole
  cross-attention cache."""
  return jnp.einsum('...TH,...SH->...TS', q, k)


def _scores_fwd(q, k):
  return scores(q, k), (q, k)


def _scores_bwd(residuals, g):
  q, k = residuals
  return (g @ k).astype(q.dtype), _major_contract(g, q).astype(k.dtype)


scores.defvjp(_scores_fwd, _scores_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def expand_batch(bias: Array, batch: int) -> Array:
  """A [1, ...] bias broadcast to [batch, ...], whose gradient is a contraction
  with a vector of ones; the forward broadcast stays lazy."""
  return jnp.broadcast_to(bias, (batch,) + bias.shape[1:])


def _expand_batch_fwd(bias, batch):
  return expand_batch(bias, batch), None


def _expand_batch_bwd(batch, _, grad):
  return (jnp.einsum('b,b...->...', jnp.ones((batch,), grad.dtype), grad)[None],)


expand_batch.defvjp(_expand_batch_fwd, _expand_batch_bwd)


def _arrange(x: Array, have: str, want: str) -> Array:
  """x with axes named `have` transposed to the order `want`."""
  if have == want:
    return x
  return jnp.transpose(x, [have.index(c) for c in want])


def einsum(spec: str, a: Array, b: Array) -> Array:
  """`jnp.einsum(spec, a, b)` for one-letter axes, run as `product` / `scores`.

  Two forms are recognised; any other contraction is left to jnp.einsum:
    - no batch axis (a dense layer, 'BTD,DNH->BNTH'): one 2-D product
      [a's free axes, contracted] x [contracted, b's free axes];
    - batch axes and one free axis each ('BNTH,BNSH->BNTS',
      'BNTS,BNSH->BNTH'): `scores` when b's contracted axis is its last,
      else `product`.
  """
  inputs, out = spec.replace(' ', '').split('->')
  lhs, rhs = inputs.split(',')
  batch = ''.join(c for c in out if c in lhs and c in rhs)
  contract = ''.join(c for c in rhs if c in lhs and c not in out)
  free_a = ''.join(c for c in out if c in lhs and c not in rhs)
  free_b = ''.join(c for c in out if c in rhs and c not in lhs)
  if (len(lhs) != len(batch + contract + free_a) or
      len(rhs) != len(batch + contract + free_b) or not contract):
    return jnp.einsum(spec, a, b)
  size = dict(zip(lhs, a.shape)) | dict(zip(rhs, b.shape))
  if not batch:
    k = int(np.prod([size[c] for c in contract]))
    y = product(_arrange(a, lhs, free_a + contract).reshape(-1, k),
                _arrange(b, rhs, contract + free_b).reshape(k, -1))
    y = y.reshape([size[c] for c in free_a + free_b])
    return _arrange(y, free_a + free_b, out)
  if len(free_a) == len(free_b) == len(contract) == 1:
    a = _arrange(a, lhs, batch + free_a + contract)
    if rhs == batch + free_b + contract:
      y = scores(a, b)
    else:
      y = product(a, _arrange(b, rhs, batch + contract + free_b))
    return _arrange(y, batch + free_a + free_b, out)
  return jnp.einsum(spec, a, b)


def attention(q: Array, k: Array, v: Array, *, bias: Optional[Array] = None,
              mask: Optional[Array] = None, scale: float = 1.0,
              dropout: Optional[Callable[[Array], Array]] = None) -> Array:
  """softmax(scale q.k + bias, masked) v: q [B,T,N,H], k / v [B,N,S,H] -> [B,T,N,H].

  As `t5x_lite.layers.attention`; softmax in float32. The weights are
  normalised after the product with v, on [.., T, H] rather than [.., T, S],
  so the backward pass needs no sum over S (FlashAttention's rowsum(dO O)).
  """
  if scale != 1.0:
    q = q * jnp.asarray(scale, q.dtype)
  logits = scores(jnp.swapaxes(q, 1, 2), k).astype(jnp.float32)
  if bias is not None:
    bias = bias.astype(jnp.float32)
    logits = logits + (expand_batch(bias, q.shape[0]) if bias.shape[0] == 1 else bias)
  if mask is not None:
    logits = logits + jnp.where(mask, 0.0, MASK_LOGIT)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  total = weights.sum(-1, keepdims=True)
  weights = weights.astype(q.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.swapaxes((product(weights, v) / total).astype(q.dtype), 1, 2)
