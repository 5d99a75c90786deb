"""Flax linen building blocks shared by the model zoo.

Every parameter is created through `nn.with_logical_partitioning` with names
from this small set, and key activations carry logical constraints:

  batch, length, embed, heads, kv, joined_kv, mlp, vocab, relpos_buckets

Shapes in einsum strings use one letter per axis:
  B batch, T query length, S key length, D embed, N heads, H head dim,
  F mlp, V vocab.

Masks are boolean `[B, 1, T, S]` arrays (True = may attend); they become
additive biases once per stack with `mask_to_bias`.
"""

import functools
import operator
from typing import Any, Callable, Optional, Sequence, Union

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Large negative logit for masked positions; finite so that a fully masked row
# gives a uniform softmax instead of NaN.
MASK_LOGIT = -1e10

LOGICAL_AXIS_NAMES = ('batch', 'length', 'embed', 'heads', 'kv', 'joined_kv',
                      'mlp', 'vocab', 'relpos_buckets', 'layers')

default_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal')
attention_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
relpos_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')


def canonicalize_dtype(dtype: Union[str, DType]) -> jnp.dtype:
  """'bfloat16' / jnp.bfloat16 / np.dtype -> np.dtype."""
  return jnp.dtype(dtype)


def constrain(x: Array, names: Sequence[str]) -> Array:
  """Logical sharding constraint (a no-op without mesh and rules)."""
  return nn.with_logical_constraint(x, tuple(names))


def activation_fn(name_or_fn: Union[str, Callable]) -> Callable:
  """'linear' | 'gelu_exact' (erf GELU) | a flax.linen name ('gelu' is the tanh
  form, 'relu', 'silu', ...) | a callable."""
  if name_or_fn == 'linear':
    return lambda x: x
  if name_or_fn == 'gelu_exact':
    return gelu_exact
  if isinstance(name_or_fn, str):
    return getattr(nn, name_or_fn)
  return name_or_fn


def matmul(x: Array, kernel: Array, num_contract: int = 1) -> Array:
  """Contracts the last `num_contract` axes of `x` with the leading ones of `kernel`.

  Computed as one 2-D [tokens, in] x [in, out] matrix product: XLA's CPU
  backend runs the backward pass of the equivalent 3-D einsum through
  transposed copies that cost more than the product itself.
  """
  lead, in_dims = x.shape[:x.ndim - num_contract], x.shape[x.ndim - num_contract:]
  out_dims = kernel.shape[num_contract:]
  n_in = int(np.prod(in_dims))
  y = product(x.reshape(-1, n_in), kernel.reshape(n_in, -1))
  return y.reshape(lead + out_dims)


def lookup(table: Array, ids: Array, axis: int, dtype: DType) -> Array:
  """`table` gathered at `ids` along `axis`, then cast to `dtype`.

  Cast after the gather, so that the gradient's scatter-add accumulates in the
  table's (param) dtype. A bfloat16 scatter-add runs as compare-and-swap loops
  on GPU: the relative position bias's backward pass of the bench model took
  1.27 s that way on an H200, against 0.86 ms in float32 (the whole train step:
  14 ms); and summing more than 256 ones in bfloat16 is inexact.
  """
  return jnp.take(table, ids, axis=axis).astype(canonicalize_dtype(dtype))


def _swap(x: Array) -> Array:
  """x with its last two axes swapped, as a materialised copy."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _major_contract(a: Array, g: Array) -> Array:
  """a^T g, [..., T, S] x [..., T, H] -> [..., S, H]: a product's gradient form.

  It contracts both operands' major axis, which XLA's CPU backend runs
  1.1-2x slower than a product contracting the left operand's minor axis
  (and it folds any plain transpose back into the product). So the smaller
  of a and g is transposed as a copy first: (a^T) g, or (g^T a)^T. Other
  backends pay for the small transposed copies."""
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

  Not `product(q, k^T)`: XLA's CPU backend would then copy k^T at every
  decoding step, a whole cross-attention cache (1.4x slower greedy decoding)."""
  return jnp.einsum('...TH,...SH->...TS', q, k)


def _scores_fwd(q, k):
  return scores(q, k), (q, k)


def _scores_bwd(residuals, g):
  q, k = residuals
  return (g @ k).astype(q.dtype), _major_contract(g, q).astype(k.dtype)


scores.defvjp(_scores_fwd, _scores_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def expand_batch(bias: Array, batch: int) -> Array:
  """A [1, ...] bias broadcast to [batch, ...], whose gradient is a contraction.

  The gradient of a broadcast over the leading axis is a sum over that axis,
  which XLA's CPU backend runs about 40x slower than the same sum written as
  a contraction with a vector of ones; the forward broadcast stays lazy.
  """
  return jnp.broadcast_to(bias, (batch,) + bias.shape[1:])


def _expand_batch_fwd(bias, batch):
  return expand_batch(bias, batch), None


def _expand_batch_bwd(batch, _, grad):
  return (jnp.einsum('b,b...->...', jnp.ones((batch,), grad.dtype), grad)[None],)


expand_batch.defvjp(_expand_batch_fwd, _expand_batch_bwd)


# -----------------------------------------------------------------------------
# Parameterised layers.
# -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
        (x.shape[-1],), canonicalize_dtype(self.param_dtype))
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) +
                          self.epsilon)
    dtype = canonicalize_dtype(self.dtype)
    return y.astype(dtype) * scale.astype(dtype)


class Embed(nn.Module):
  """Token embedding looked up by gather; `attend` gives tied logits."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
        (self.num_embeddings, self.features),
        canonicalize_dtype(self.param_dtype))

  def __call__(self, tokens: Array) -> Array:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'Embed expects integer token ids, got {tokens.dtype}.')
    x = lookup(self.embedding, tokens, 0, self.dtype)
    return constrain(x, ('batch', 'length', 'embed'))

  def attend(self, x: Array) -> Array:
    """[B,T,D] -> [B,T,V] float32 logits against the embedding table."""
    logits = matmul(x.astype(jnp.float32), self.embedding.astype(jnp.float32).T)
    return constrain(logits, ('batch', 'length', 'vocab'))


class DenseGeneral(nn.Module):
  """Bias-free linear map contracting the last `num_contract` input axes.

  The kernel has shape `in_dims + features` and logical names `kernel_axes`;
  it is initialised as a 2D [fan_in, fan_out] matrix (as T5X does), so
  fan-in based initialisers see the true fan-in.
  """
  features: Union[int, Sequence[int]]
  kernel_axes: Sequence[str]
  num_contract: int = 1
  kernel_init: Initializer = default_kernel_init
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = ((self.features,) if isinstance(self.features, int) else
                tuple(self.features))
    in_dims = x.shape[x.ndim - self.num_contract:]
    n_in, n_out = int(np.prod(in_dims)), int(np.prod(features))

    def init(rng, shape, dtype):
      return self.kernel_init(rng, (n_in, n_out), dtype).reshape(shape)

    kernel = self.param(
        'kernel', nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
        tuple(in_dims) + features, canonicalize_dtype(self.param_dtype))
    dtype = canonicalize_dtype(self.dtype)
    return matmul(x.astype(dtype), kernel.astype(dtype), self.num_contract)


class RelativePositionBias(nn.Module):
  """T5 bucketed relative position bias, `[1, N, T, S]`.

  Computed once per stack from the plain `arange` of the (packed) row, as T5X
  does. Inside one packed segment this equals using per-segment positions
  (positions advance by one inside a segment), and attention across segments
  is masked, so the result is the same at a fraction of the cost.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @staticmethod
  def bucket(relative_position: np.ndarray, bidirectional: bool,
             num_buckets: int, max_distance: int) -> np.ndarray:
    """Maps `key_pos - query_pos` to a bucket in [0, num_buckets)."""
    ret = np.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
      num_buckets //= 2
      ret += (n < 0).astype(np.int32) * num_buckets
      n = np.abs(n)
    else:
      n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
        np.log(max_distance / max_exact) *
        (num_buckets - max_exact)).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)

  @nn.compact
  def __call__(self, qlen: int, klen: int) -> Array:
    table = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(relpos_init, ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets),
        canonicalize_dtype(self.param_dtype))
    rel = np.arange(klen)[None, :] - np.arange(qlen)[:, None]
    buckets = self.bucket(rel.astype(np.int32), self.bidirectional,
                          self.num_buckets, self.max_distance)
    bias = lookup(table, jnp.asarray(buckets), 1, self.dtype)  # [N, T, S]
    return bias[None]


def heads_major(x: Array) -> Array:
  """[B,T,N,H] -> [B,N,T,H], the layout attention contracts in."""
  return constrain(x.transpose(0, 2, 1, 3), ('batch', 'heads', 'length', 'kv'))


def dot_product_attention(q: Array, k: Array, v: Array,
                          biases: Sequence[Optional[Array]] = (),
                          dropout: Optional[Callable[[Array], Array]] = None) -> Array:
  """softmax(q.k + biases) v, heads-major: [B,N,T,H], [B,N,S,H] -> [B,T,N,H].

  Logits and softmax are float32; the weights go back to q's dtype. `biases`
  are additive [B|1, N|1, T, S] logit biases (None skipped); one shared over
  the batch (a position bias) is expanded with `expand_batch`. `dropout`, if
  given, acts on the attention weights.
  """
  logits = scores(q, k).astype(jnp.float32)
  for bias in biases:
    if bias is not None and bias.shape[0] == 1:
      logits = logits + expand_batch(bias.astype(jnp.float32), q.shape[0])
    elif bias is not None:
      logits = logits + bias.astype(jnp.float32)
  # Normalised after the product with v, on [.., T, H] rather than [.., T, S]:
  # the backward pass then needs no sum over S (FlashAttention's rowsum(dO O)).
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  total = weights.sum(-1, keepdims=True)
  weights = weights.astype(q.dtype)
  if dropout is not None:
    weights = dropout(weights)
  x = (product(weights, v) / total).astype(q.dtype).transpose(0, 2, 1, 3)
  return constrain(x, ('batch', 'length', 'heads', 'kv'))


def _cached_key_value(module: nn.Module, k: Optional[Array],
                      v: Optional[Array], mode: str,
                      mask_bias: Optional[Array] = None):
  """Heads-major keys and values [B,N,S,H] to attend to under a decode-time KV cache.

  mode 'self': the T new keys / values ([B,N,T,H]) are written into the
  `cached_key` / `cached_value` buffers [B,N,S,H] (S: the key length of `mask_bias`, fixed
  when the cache is created) of the 'cache' collection at each
  row's `cache_index` [B], which then advances by T; all S slots are
  returned (the caller's mask hides slots not yet written).
  mode 'cross': the keys / values of the first call are stored and reused.
  """
  names = ('batch', 'heads', 'length', 'kv')
  if mode == 'cross':
    cached_key = module.variable('cache', 'cached_key', lambda: k)
    cached_value = module.variable('cache', 'cached_value', lambda: v)
    return cached_key.value, cached_value.value
  if mode != 'self':
    raise ValueError(f"cache={mode!r}; use None, 'self' or 'cross'.")
  if mask_bias is None:
    raise ValueError('Cached attention needs a mask_bias over the cache slots.')
  batch, heads, steps, head_dim = k.shape
  shape = (batch, heads, mask_bias.shape[-1], head_dim)
  cached_key = module.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
  cached_value = module.variable('cache', 'cached_value', jnp.zeros, shape,
                                 v.dtype)
  cache_index = module.variable('cache', 'cache_index', jnp.zeros, (batch,),
                                jnp.int32)
  index = cache_index.value

  def write(buffer, new):
    update = jax.vmap(
        lambda b, x, i: jax.lax.dynamic_update_slice(b, x, (0, i, 0)))
    return constrain(update(buffer, new.astype(buffer.dtype), index), names)

  cached_key.value = write(cached_key.value, k)
  cached_value.value = write(cached_value.value, v)
  cache_index.value = index + steps
  return cached_key.value, cached_value.value


def _has_cross_cache(module: nn.Module, mode: Optional[str]) -> bool:
  """Whether cross-attention keys / values are already in the cache (then
  `inputs_kv` may be None)."""
  return mode == 'cross' and module.has_variable('cache', 'cached_key')


class _Kernel(nn.Module):
  """Holds one `kernel` param, so attention params read `query/kernel`."""
  shape: Sequence[int]
  axes: Sequence[str]
  init: Initializer
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param(
        'kernel', nn.with_logical_partitioning(self.init, tuple(self.axes)),
        tuple(self.shape), canonicalize_dtype(self.param_dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with T5 conventions.

  Kernels are stored 2D as in T5X checkpoints: q/k/v `[D, N*H]`
  ('embed', 'joined_kv') and out `[N*H, D]` ('joined_kv', 'embed'). Logits
  are not scaled by 1/sqrt(H): the query initialiser carries that factor.
  Dropout on the attention weights is shared across queries, as in T5X.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Initializer = attention_kernel_init

  def _kernel(self, name: str, shape, axes, init) -> Array:
    kernel = _Kernel(shape, tuple(axes), init, self.param_dtype, name=name)()
    return kernel.astype(canonicalize_dtype(self.dtype))

  @nn.compact
  def __call__(self,
               inputs_q: Array,
               inputs_kv: Array,
               mask_bias: Optional[Array] = None,
               position_bias: Optional[Array] = None,
               deterministic: bool = True,
               cache: Optional[str] = None) -> Array:
    """[B,T,D] attending to [B,S,D] -> [B,T,D].

    `mask_bias` ([B,1,T,S]) and `position_bias` ([1|B,N,T,S]) are additive
    logit biases, built once per stack and added here so that no
    [B,N,T,S] bias is ever materialised outside the logits.
    `cache` (decoding only): None, 'self' (KV cache of S = mask_bias's key
    length slots; see `_cached_key_value`) or 'cross' (keys / values of
    `inputs_kv` computed on the first call, then reused).
    """
    dtype = canonicalize_dtype(self.dtype)
    n, h, d = self.num_heads, self.head_dim, inputs_q.shape[-1]
    depth_scaling = float(np.sqrt(h))  # a Python float keeps param_dtype

    def query_init(*args):
      return self.kernel_init(*args) / depth_scaling

    in_axes = ('embed', 'joined_kv')
    wq = self._kernel('query', (d, n * h), in_axes, query_init)
    wk = self._kernel('key', (d, n * h), in_axes, self.kernel_init)
    wv = self._kernel('value', (d, n * h), in_axes, self.kernel_init)
    wo = self._kernel('out', (n * h, d), ('joined_kv', 'embed'),
                      self.kernel_init)

    heads = ('batch', 'length', 'heads', 'kv')

    def project(x, kernel):
      y = matmul(x.astype(dtype), kernel)
      return heads_major(constrain(y.reshape(y.shape[:-1] + (n, h)), heads))

    q = project(inputs_q, wq)
    if _has_cross_cache(self, cache):
      k, v = _cached_key_value(self, None, None, cache)
    else:
      k, v = project(inputs_kv, wk), project(inputs_kv, wv)
      if cache is not None:
        k, v = _cached_key_value(self, k, v, cache, mask_bias)

    dropout = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout = functools.partial(
          nn.Dropout(self.dropout_rate, broadcast_dims=(-2,)), deterministic=False)
    x = dot_product_attention(q, k, v, (mask_bias, position_bias), dropout)
    out = matmul(x.reshape(x.shape[:-2] + (n * h,)), wo)
    return constrain(out, ('batch', 'length', 'embed'))


class GatedMlp(nn.Module):
  """T5 MLP: product of `len(activations)` input projections, then `wo`.

  Param names follow T5X: `wi` for one activation, else `wi_0, wi_1, ...`.
  """
  mlp_dim: int
  activations: Sequence[Union[str, Callable]] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dense = functools.partial(DenseGeneral, kernel_init=self.kernel_init,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = []
    for i, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
      y = dense(self.mlp_dim, kernel_axes=('embed', 'mlp'), name=name)(x)
      hidden.append(activation_fn(act)(y))
    y = functools.reduce(operator.mul, hidden)
    y = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)
    y = constrain(y, ('batch', 'length', 'mlp'))
    out = dense(x.shape[-1], kernel_axes=('mlp', 'embed'), name='wo')(y)
    return constrain(out, ('batch', 'length', 'embed'))


# -----------------------------------------------------------------------------
# Masks. Boolean [B, 1, T, S]; True means "may attend".
# -----------------------------------------------------------------------------
def make_attention_mask(query_input: Array,
                        key_input: Array,
                        pairwise_fn: Callable = jnp.logical_and) -> Array:
  """[B,T], [B,S] -> [B,1,T,S] from a pairwise function (default: both valid)."""
  mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
  return mask[:, None].astype(bool)


def make_causal_mask(length: int) -> Array:
  """[1,1,T,T] lower-triangular mask (a query sees itself and the past)."""
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the given masks (None entries are skipped)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def make_decoder_mask(decoder_target_tokens: Array,
                      decoder_causal_attention: Optional[Array] = None,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Decoder self-attention mask as in T5X.

  Causal AND padding, where valid positions are `decoder_target_tokens > 0`
  (so a leading BOS=0 in the decoder inputs is not masked), AND same-segment
  when packed. Where `decoder_causal_attention` is 1 (a prefix-LM "inputs"
  span), attention is bidirectional within that span.
  """
  valid = decoder_target_tokens > 0
  causal = make_causal_mask(decoder_target_tokens.shape[-1])
  if decoder_causal_attention is not None:
    prefix = make_attention_mask(decoder_causal_attention > 0,
                                 decoder_causal_attention > 0)
    causal = jnp.logical_or(causal, prefix)
  mask = combine_masks(causal, make_attention_mask(valid, valid))
  if decoder_segment_ids is not None:
    mask = combine_masks(
        mask,
        make_attention_mask(decoder_segment_ids, decoder_segment_ids,
                            jnp.equal))
  return mask


def mask_to_bias(mask: Optional[Array], dtype: DType = jnp.float32):
  """Boolean mask -> additive bias (0 where allowed, MASK_LOGIT elsewhere)."""
  if mask is None:
    return None
  return jnp.where(mask, 0.0, MASK_LOGIT).astype(canonicalize_dtype(dtype))


# -----------------------------------------------------------------------------
# Biased blocks (BERT family): LayerNorm with bias, Dense with bias, learned
# absolute position tables and scaled attention with biases.
#
# One more logical name is used here:
#   abspos  rows of a small learned table indexed by absolute position or by
#           token type. No rule set maps it, so these tables are replicated.
# -----------------------------------------------------------------------------
class LayerNorm(nn.Module):
  """Standard layer norm (mean and variance, then scale and bias), float32 math."""
  epsilon: float = 1e-12
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (x.shape[-1],)
    param_dtype = canonicalize_dtype(self.param_dtype)
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
        features, param_dtype)
    bias = self.param(
        'bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
        features, param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(canonicalize_dtype(self.dtype))


class Dense(nn.Module):
  """`x @ kernel + bias` over the last axis; kernel [in, out], bias [out].

  `kernel_axes` names the two kernel axes; the bias takes the output name.
  """
  features: int
  kernel_axes: Sequence[Optional[str]]
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axes = tuple(self.kernel_axes)
    param_dtype = canonicalize_dtype(self.param_dtype)
    kernel = self.param('kernel', nn.with_logical_partitioning(
        self.kernel_init, axes), (x.shape[-1], self.features), param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(
        self.bias_init, axes[-1:]), (self.features,), param_dtype)
    dtype = canonicalize_dtype(self.dtype)
    return matmul(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class PositionEmbed(nn.Module):
  """A learned table `[num_embeddings, D]` ('abspos', 'embed') looked up by id.

  Used for absolute positions and for token types (segments) in BERT.
  """
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param(
        'embedding',
        nn.with_logical_partitioning(self.embedding_init, ('abspos', 'embed')),
        (self.num_embeddings, self.features),
        canonicalize_dtype(self.param_dtype))
    x = lookup(table, ids.astype(jnp.int32), 0, self.dtype)
    return constrain(x, ('batch', 'length', 'embed'))


class BiasedMultiHeadAttention(nn.Module):
  """BERT-style attention: q/k/v/out projections with biases, 1/sqrt(H) scaling.

  Params: `{query,key,value}/{kernel [D, N*H], bias [N*H]}` ('embed',
  'joined_kv') and `out/{kernel [N*H, D], bias [D]}`. Dropout acts on the
  attention probabilities, element-wise (as in BERT). `out_kernel_init`
  (default: `kernel_init`) initialises the output projection.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  out_kernel_init: Optional[Initializer] = None

  @nn.compact
  def __call__(self,
               inputs_q: Array,
               inputs_kv: Array,
               mask_bias: Optional[Array] = None,
               deterministic: bool = True,
               cache: Optional[str] = None) -> Array:
    """[B,T,D] attending to [B,S,D] -> [B,T,D]; `mask_bias` is [B,1,T|1,S].

    `cache`: as in `MultiHeadAttention` (decoding only).
    """
    dtype = canonicalize_dtype(self.dtype)
    n, h, d = self.num_heads, self.head_dim, inputs_q.shape[-1]
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    in_axes = ('embed', 'joined_kv')
    heads = ('batch', 'length', 'heads', 'kv')

    def project(name, x):
      y = dense(n * h, kernel_axes=in_axes, kernel_init=self.kernel_init, name=name)(x)
      return heads_major(constrain(y.reshape(y.shape[:-1] + (n, h)), heads))

    q = project('query', inputs_q)
    if _has_cross_cache(self, cache):
      k, v = _cached_key_value(self, None, None, cache)
    else:
      k = project('key', inputs_kv)
      v = project('value', inputs_kv)
      if cache is not None:
        k, v = _cached_key_value(self, k, v, cache, mask_bias)
    q = q / jnp.asarray(np.sqrt(h), dtype)
    dropout = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout = functools.partial(nn.Dropout(self.dropout_rate), deterministic=False)
    x = dot_product_attention(q, k, v, (mask_bias,), dropout)
    x = x.reshape(x.shape[:-2] + (n * h,))
    out = dense(d, kernel_axes=('joined_kv', 'embed'),
                kernel_init=self.out_kernel_init or self.kernel_init, name='out')(x)
    return constrain(out, ('batch', 'length', 'embed'))


class BiasedMlp(nn.Module):
  """BERT MLP: `wo(dropout(act(wi(x))))`, both with biases; exact (erf) GELU
  by default. The dropout (HF BART's `activation_dropout`) is off by default;
  `out_kernel_init` (default: `kernel_init`) initialises `wo`."""
  mlp_dim: int
  activation: Union[str, Callable] = 'gelu_exact'
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  out_kernel_init: Optional[Initializer] = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    y = dense(self.mlp_dim, kernel_axes=('embed', 'mlp'), kernel_init=self.kernel_init,
              name='wi')(x)
    y = constrain(activation_fn(self.activation)(y), ('batch', 'length', 'mlp'))
    if self.dropout_rate > 0.0:
      y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    out = dense(x.shape[-1], kernel_axes=('mlp', 'embed'),
                kernel_init=self.out_kernel_init or self.kernel_init, name='wo')(y)
    return constrain(out, ('batch', 'length', 'embed'))


def gelu_exact(x: Array) -> Array:
  """GELU with the erf (HF BERT's 'gelu'); `nn.gelu` defaults to the tanh form."""
  return jax.nn.gelu(x, approximate=False)
