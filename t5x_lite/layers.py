"""Flax linen building blocks shared by the model zoo.

The math is plain einsum with one letter per axis, run through `t5x_lite.ops`
(which picks the kernels for the backend; see there):

  B batch, T query length, S key length, D embed, N heads, K key / value
  heads (grouped-query attention), H head dim, F mlp, V vocab.

Every parameter is created through `nn.with_logical_partitioning` with names
from this small set, and key activations carry logical constraints:

  batch, length, embed, heads, kv, joined_kv, mlp, vocab, relpos_buckets, layers

(plus `kv_heads`, the key / value heads of grouped-query attention, which the
rule sets shard like 'heads' where the mesh divides them and replicate
otherwise; and `abspos`, the rows of small learned tables indexed by absolute
position or token type, which no rule set maps, so they are replicated).

Masks are boolean `[B|1, 1, T|1, S]` arrays (True = may attend), built once
per stack by `make_attention_mask` for every family.
"""

import functools
import operator
from typing import Any, Callable, Optional, Sequence, Union

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import lora
from t5x_lite import ops
from t5x_lite.rotary import RopeScaling, apply_rope, rope_frequencies

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

LOGICAL_AXIS_NAMES = ('batch', 'length', 'embed', 'heads', 'kv', 'joined_kv',
                      'mlp', 'vocab', 'relpos_buckets', 'layers', 'kv_heads')

# Logical names of the one-letter axes of the einsum strings.
AXIS_NAMES = {'B': 'batch', 'T': 'length', 'S': 'length', 'D': 'embed',
              'N': 'heads', 'K': 'kv_heads', 'H': 'kv', 'F': 'mlp', 'V': 'vocab'}

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


def named(x: Array, layout: str) -> Array:
  """`constrain` by a layout string of one-letter axes ('BTNH')."""
  return constrain(x, [AXIS_NAMES[c] for c in layout])


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


def dense_spec(lead: int, contract: int, features: int) -> str:
  """The einsum of `lead` free axes and `contract` contracted axes of x with a
  kernel [contracted..., features...]: e.g. (2, 1, 1) -> 'abD,DF->abF'."""
  a, k, f = 'abcdefg'[:lead], 'DEGHIJ'[:contract], 'FKLMOP'[:features]
  return f'{a}{k},{k}{f}->{a}{f}'


def lookup(table: Array, ids: Array, axis: int, dtype: DType) -> Array:
  """`table` gathered at `ids` along `axis`, then cast to `dtype`.

  Cast after the gather, so that the gradient's scatter-add accumulates in the
  table's (param) dtype: a bfloat16 scatter-add runs as slow compare-and-swap
  loops on GPU, and summing more than 256 ones in bfloat16 is inexact.
  """
  return jnp.take(table, ids, axis=axis).astype(canonicalize_dtype(dtype))


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
    logits = ops.einsum('BTD,VD->BTV', x.astype(jnp.float32),
                        self.embedding.astype(jnp.float32))
    return constrain(logits, ('batch', 'length', 'vocab'))


class DenseGeneral(nn.Module):
  """Linear map contracting the last `num_contract` input axes, optionally biased.

  The kernel has shape `in_dims + features` and logical names `kernel_axes`
  (the bias, shape `features`, takes the output names); it is initialised
  as a 2D [fan_in, fan_out] matrix (as T5X does), so fan-in based
  initialisers see the true fan-in. With a LoRA adapter beside the kernel
  (`lora.attach`) the output gains its low-rank update (`lora.term`).
  """
  features: Union[int, Sequence[int]]
  kernel_axes: Sequence[Optional[str]]
  num_contract: int = 1
  use_bias: bool = False
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros
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

    axes, param_dtype = tuple(self.kernel_axes), canonicalize_dtype(self.param_dtype)
    kernel = self.param('kernel', nn.with_logical_partitioning(init, axes),
                        tuple(in_dims) + features, param_dtype)
    dtype = canonicalize_dtype(self.dtype)
    spec = dense_spec(x.ndim - self.num_contract, self.num_contract, len(features))
    y = ops.einsum(spec, x.astype(dtype), kernel.astype(dtype))
    adapter = lora.adapter(self)
    if adapter is not None:
      lead = 'abcdefg'[:x.ndim - self.num_contract]
      y = y + lora.term(x.astype(dtype), lead + 'DEGHIJ'[:self.num_contract],
                        adapter, 'FKLMOP'[:len(features)], lead + 'FKLMOP'[:len(features)],
                        dtype)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          self.bias_init, axes[self.num_contract:]), features, param_dtype)
      y = y + bias.astype(dtype)
    return y


class Dense(DenseGeneral):
  """`x @ kernel + bias` over the last axis; kernel [in, out], bias [out]."""
  use_bias: bool = True


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


def _cache_write(buffer: Array, new: Array, index: Array, axis: int) -> Array:
  """Each row's `new` written into `buffer` at its `index` along `axis`."""
  def write(b, x, i):
    start = [0] * b.ndim
    start[axis - 1] = i
    return jax.lax.dynamic_update_slice(b, x.astype(b.dtype), start)
  return jax.vmap(write)(buffer, new, index)


class _Weights(nn.Module):
  """One projection's `kernel` [in, out...] and, with `use_bias`, `bias`
  [out...], cast to `dtype`; so attention params read `query/kernel`,
  `query/bias`. A kernel with several output axes is initialised as the 2D
  [in, prod(out)] matrix (as DenseGeneral's), so initialisers see its fans.
  The third result is the projection's LoRA adapter (`lora.adapter`), or None."""
  shape: Sequence[int]
  axes: Sequence[str]
  init: Initializer
  use_bias: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self):
    param_dtype, dtype = canonicalize_dtype(self.param_dtype), canonicalize_dtype(self.dtype)
    def init_2d(rng, shape, dtype):
      return self.init(rng, (shape[0], int(np.prod(shape[1:]))), dtype).reshape(shape)

    init = init_2d if len(self.shape) > 2 else self.init
    kernel = self.param('kernel', nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(self.shape), param_dtype).astype(dtype)
    adapter = lora.adapter(self)
    if not self.use_bias:
      return kernel, None, adapter
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, tuple(self.axes[1:])), tuple(self.shape[1:]), param_dtype)
    return kernel, bias.astype(dtype), adapter


def _heads_bias(bias: Optional[Array], layout: str, n: int, h: int):
  """A projection's bias [N*H] shaped to broadcast over heads in `layout`."""
  if bias is None:
    return 0.0
  return bias.reshape([{'N': n, 'H': h}.get(c, 1) for c in layout])


class Attention(nn.Module):
  """Multi-head dot-product attention, the one attention of every family.

  Params (as in T5X and Hugging Face checkpoints): `{query,key,value}/kernel`
  [D, N*H] ('embed', 'joined_kv') and `out/kernel` [N*H, D]; with `use_bias`
  also `{query,key,value}/bias` [N*H] and `out/bias` [D].

  Logit scaling: `scale_logits=False` (T5) leaves logits unscaled and folds
  1/sqrt(H) into the query kernel's initialiser; True (BERT, GPT-2, BART)
  scales them by 1/sqrt(H). Dropout acts on the attention weights [B,N,T,S],
  shared along `dropout_broadcast_dims` ((-2,): across queries, as T5X; ():
  element-wise, as BERT). `out_kernel_init` (default `kernel_init`)
  initialises `out`.

  Llama-style options (off by default): `num_kv_heads` K < N gives
  grouped-query attention, keys and values (and the KV cache) with K heads,
  each shared by N/K query heads: `{key,value}/kernel` [D, K, H] ('embed',
  'kv_heads', 'kv'), biases [K, H], the heads an axis of their own so that
  the rules can shard them where the mesh divides K. `rope_theta` rotates
  queries and keys by their positions (`apply_rope`, with `rope_scaling`).
  `out_bias` False leaves `out` unbiased while `use_bias` biases the query,
  key and value projections (Qwen2). A projection with a LoRA adapter beside
  its kernel (`lora.attach`) adds its low-rank update, in the layout of
  that projection's output.
  """
  num_heads: int
  head_dim: int
  num_kv_heads: Optional[int] = None
  rope_theta: Optional[float] = None
  rope_scaling: Optional[RopeScaling] = None
  use_bias: bool = False
  out_bias: Optional[bool] = None  # None: as use_bias
  scale_logits: bool = False
  dropout_rate: float = 0.0
  dropout_broadcast_dims: Sequence[int] = (-2,)
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Initializer = attention_kernel_init
  out_kernel_init: Optional[Initializer] = None

  def _weights(self, name: str, shape, axes, init: Initializer,
               use_bias: Optional[bool] = None):
    use_bias = self.use_bias if use_bias is None else use_bias
    return _Weights(tuple(shape), tuple(axes), init, use_bias, self.dtype,
                    self.param_dtype, name=name)()

  @nn.compact
  def __call__(self,
               inputs_q: Array,
               inputs_kv: Optional[Array],
               mask: Optional[Array] = None,
               bias: Optional[Array] = None,
               deterministic: bool = True,
               cache: Optional[str] = None,
               positions: Optional[Array] = None) -> Array:
    """[B,T,D] attending to [B,S,D] -> [B,T,D].

    `mask`: boolean [B|1,1,T|1,S]; `bias`: additive [1|B,N,T,S] (a position
    bias). `cache` (decoding only): None; 'self', a KV cache of S slots (S:
    the mask's key length, fixed when the cache is created) that the T new
    keys / values are written into at each row's `cache_index`, which then
    advances by T (the mask hides slots not yet written); or 'cross', the
    keys / values of `inputs_kv` computed on the first call, then reused
    (later calls may pass None). `positions` [B|1,T] (self-attention with
    `rope_theta` only): the positions of the T tokens, for queries and keys.
    """
    dtype = canonicalize_dtype(self.dtype)
    n, h, d = self.num_heads, self.head_dim, inputs_q.shape[-1]
    kv_heads = self.num_kv_heads or n
    if n % kv_heads:
      raise ValueError(f'num_heads={n} is not a multiple of num_kv_heads={kv_heads}.')
    if self.rope_theta is not None and positions is None:
      raise ValueError('Rotary attention needs the positions of its tokens.')
    inv_freq = (None if self.rope_theta is None else
                rope_frequencies(h, self.rope_theta, self.rope_scaling))
    kernel_init = self.kernel_init

    def query_init(*args):
      return kernel_init(*args) / float(np.sqrt(h))  # a Python float keeps the dtype

    layout = ops.kv_layout()  # of keys and values: 'BSNH', or 'BNSH' on CPU kernels
    in_axes = ('embed', 'joined_kv')
    wq, bq, lq = self._weights('query', (d, n * h), in_axes,
                               kernel_init if self.scale_logits else query_init)
    q = ops.einsum('BTD,DNH->BTNH', inputs_q.astype(dtype), wq.reshape(d, n, h))
    if lq is not None:
      q = q + lora.term(inputs_q.astype(dtype), 'BTD', lq, 'NH', 'BTNH', dtype,
                        out_shape=(n, h))
    q = q + _heads_bias(bq, 'BTNH', n, h)
    if inv_freq is not None:
      q = apply_rope(q, positions, inv_freq, 'BTNH')
    q = named(q, 'BTNH')
    kv_shape = (d, n * h)
    if self.num_kv_heads is not None:  # grouped: K key / value heads
      layout, in_axes = layout.replace('N', 'K'), ('embed', 'kv_heads', 'kv')
      kv_shape = (d, kv_heads, h)
    if cache == 'cross' and self.has_variable('cache', 'cached_key'):
      k = self.get_variable('cache', 'cached_key')
      v = self.get_variable('cache', 'cached_value')
    else:
      x = inputs_kv.astype(dtype)
      heads = 'K' if self.num_kv_heads is not None else 'N'
      wk, bk, lk = self._weights('key', kv_shape, in_axes, kernel_init)
      wv, bv, lv = self._weights('value', kv_shape, in_axes, kernel_init)
      k = ops.einsum(f'BSD,D{heads}H->{layout}', x, wk.reshape(d, kv_heads, h))
      v = ops.einsum(f'BSD,D{heads}H->{layout}', x, wv.reshape(d, kv_heads, h))
      if lk is not None:
        k = k + lora.term(x, 'BSD', lk, f'{heads}H', layout, dtype, out_shape=(kv_heads, h))
      if lv is not None:
        v = v + lora.term(x, 'BSD', lv, f'{heads}H', layout, dtype, out_shape=(kv_heads, h))
      k = k + _heads_bias(bk, layout.replace('K', 'N'), kv_heads, h)
      if inv_freq is not None:
        k = apply_rope(k, positions, inv_freq, layout)
      k = named(k, layout)
      v = named(v + _heads_bias(bv, layout.replace('K', 'N'), kv_heads, h), layout)
      if cache is not None:
        k, v = self._cache(k, v, cache, layout, mask)
    dropout = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout = functools.partial(
          nn.Dropout(self.dropout_rate, broadcast_dims=self.dropout_broadcast_dims),
          deterministic=False)
    if kv_heads != n and (ops.active() == 'cpu' or dropout is not None):
      # Only jax.nn.dot_product_attention (the plain path without dropout)
      # takes fewer key / value heads; the others see each one N/K times.
      axis = layout.index('K')
      k = jnp.repeat(k, n // kv_heads, axis=axis)
      v = jnp.repeat(v, n // kv_heads, axis=axis)
    scale = 1.0 / float(np.sqrt(h)) if self.scale_logits else 1.0
    x = ops.attention(q, k, v, bias=bias, mask=mask, scale=scale, dropout=dropout)
    x = named(x.astype(dtype), 'BTNH')
    wo, bo, lo = self._weights('out', (n * h, d), ('joined_kv', 'embed'),
                               self.out_kernel_init or kernel_init, self.out_bias)
    out = ops.einsum('BTNH,NHD->BTD', x, wo.reshape(n, h, d))
    if lo is not None:
      out = out + lora.term(x, 'BTNH', lo, 'D', 'BTD', dtype, in_shape=(n, h))
    return named(out + (0.0 if bo is None else bo), 'BTD')

  def _cache(self, k: Array, v: Array, mode: str, layout: str,
             mask: Optional[Array]):
    """Keys and values to attend to under a decode-time KV cache (see __call__)."""
    if mode == 'cross':
      self.variable('cache', 'cached_key', lambda: k)
      self.variable('cache', 'cached_value', lambda: v)
      return k, v
    if mode != 'self':
      raise ValueError(f"cache={mode!r}; use None, 'self' or 'cross'.")
    if mask is None:
      raise ValueError('Cached attention needs a mask over the cache slots.')
    axis = layout.index('S')
    shape = list(k.shape)
    steps, shape[axis] = shape[axis], mask.shape[-1]
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, tuple(shape), k.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, tuple(shape),
                                 v.dtype)
    cache_index = self.variable('cache', 'cache_index', jnp.zeros, (k.shape[0],),
                                jnp.int32)
    index = cache_index.value
    cached_key.value = named(_cache_write(cached_key.value, k, index, axis), layout)
    cached_value.value = named(_cache_write(cached_value.value, v, index, axis),
                               layout)
    cache_index.value = index + steps
    return cached_key.value, cached_value.value


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
# Masks. Boolean [B|1, 1, T|1, S]; True means "may attend".
# -----------------------------------------------------------------------------
def make_attention_mask(query_valid: Optional[Array],
                        key_valid: Optional[Array],
                        *,
                        query_segment_ids: Optional[Array] = None,
                        key_segment_ids: Optional[Array] = None,
                        causal: bool = False,
                        query_positions: Optional[Array] = None,
                        key_positions: Optional[Array] = None,
                        query_prefix: Optional[Array] = None,
                        key_prefix: Optional[Array] = None,
                        sliding_window: Optional[int] = None) -> Array:
  """The attention mask of every family: self, cross, causal, prefix-LM,
  packed, and over a decoding cache's slots.

  A query may attend to a key when all of these hold:
    - both are valid: `query_valid` [B,T], `key_valid` [B,S] (None: all
      valid; BERT masks keys only, so padded queries get ignored outputs);
    - with segment ids ([B,T], [B,S]), both are in the same packed segment;
    - with `causal`, the key's position is at most the query's (positions
      [B|1,T] / [B|1,S], default 0, 1, ...) ... unless both lie in the
      bidirectional prefix of a prefix LM: `key_prefix` [B,S] and
      `query_prefix` [B,T] (None: every query) mark it;
    - with `causal` and `sliding_window` w (Mistral), the key also lies
      less than w positions before the query (query - key < w).
  """
  def pairs(q, k, fn=jnp.logical_and):
    return fn(q[:, :, None], k[:, None, :])[:, None]

  masks = []
  if key_valid is not None:
    query = jnp.ones(key_valid.shape[:1] + (1,), bool) if query_valid is None else query_valid
    masks.append(pairs(query > 0, key_valid > 0))
  if query_segment_ids is not None:
    masks.append(pairs(query_segment_ids, key_segment_ids, jnp.equal))
  if causal:
    if query_positions is None:
      query_positions = jnp.arange(query_valid.shape[-1])[None]
    if key_positions is None:
      key_positions = jnp.arange(key_valid.shape[-1])[None]
    visible = pairs(query_positions, key_positions, jnp.greater_equal)
    if sliding_window is not None:
      visible = visible & pairs(query_positions, key_positions + sliding_window,
                                jnp.less)
    if key_prefix is not None:
      query = jnp.ones_like(key_prefix[:, :1]) if query_prefix is None else query_prefix
      visible = visible | pairs(query > 0, key_prefix > 0)
    masks.append(visible)
  return functools.reduce(jnp.logical_and, masks)


def make_decoder_mask(decoder_target_tokens: Array,
                      decoder_causal_attention: Optional[Array] = None,
                      decoder_segment_ids: Optional[Array] = None,
                      sliding_window: Optional[int] = None) -> Array:
  """Decoder self-attention mask as in T5X: causal and padding, where valid
  positions are `decoder_target_tokens > 0` (so a leading BOS=0 in the
  decoder inputs is not masked), and same-segment when packed. Where
  `decoder_causal_attention` is 1 (a prefix-LM "inputs" span), attention is
  bidirectional within that span. `sliding_window`: see make_attention_mask."""
  return make_attention_mask(
      decoder_target_tokens, decoder_target_tokens,
      query_segment_ids=decoder_segment_ids, key_segment_ids=decoder_segment_ids,
      causal=True, query_prefix=decoder_causal_attention,
      key_prefix=decoder_causal_attention, sliding_window=sliding_window)


# -----------------------------------------------------------------------------
# Biased blocks (BERT, GPT-2, BART): LayerNorm with bias, learned absolute
# position tables and an MLP with biases.
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
