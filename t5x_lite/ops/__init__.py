"""The kernels the model math runs on, chosen by one setting.

`t5x_lite.layers` writes every contraction as an einsum with one-letter axes
('BTD,DNH->BTNH') and attention as one call, and runs them through `einsum`
and `attention` here. The setting picks what they compile to:

  'plain'  `jnp.einsum` and `jax.nn.dot_product_attention` (the cuDNN fused
           kernel on GPU where it applies): XLA on TPU and GPU sees the plain
           contractions, free to fuse, lay out, rematerialise and partition.
  'cpu'    the kernels of `t5x_lite.ops.cpu`, made for XLA's CPU backend.
  'auto'   (default) 'cpu' when the platform being compiled for is CPU, else
           'plain'.

The setting is read when a function is traced; set it before jitting, with
`set_kernels`, the `use_kernels` context, or from gin in the entry points
(`--gin.ops.kernels.name="'plain'"`). Both give the same values and
gradients (tests/test_ops.py).
"""

import contextlib
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from t5x_lite.ops import cpu

Array = jax.Array

KERNELS = ('auto', 'plain', 'cpu')
_setting = {'kernels': 'auto', 'platform': None}


def _check(name: str) -> str:
  if name not in KERNELS:
    raise ValueError(f"kernels={name!r}; use one of {', '.join(KERNELS)}.")
  return name


def set_kernels(name: str, platform: Optional[str] = None) -> None:
  """Chooses the kernels ('auto', 'plain' or 'cpu') for what is traced next.

  `platform` is what 'auto' resolves against (default: jax's default backend;
  an ahead-of-time compile for TPU on a CPU host passes 'tpu')."""
  _setting.update(kernels=_check(name), platform=platform)


@contextlib.contextmanager
def use_kernels(name: str, platform: Optional[str] = None) -> Iterator[None]:
  """`set_kernels` for the duration of a `with` block."""
  before = dict(_setting)
  set_kernels(name, platform)
  try:
    yield
  finally:
    _setting.update(before)


def _platform() -> str:
  """The platform compiled for: the one given to `set_kernels`, else jax's default."""
  return _setting['platform'] or jax.default_backend()


def active() -> str:
  """'plain' or 'cpu': what the setting resolves to now."""
  if _setting['kernels'] != 'auto':
    return _setting['kernels']
  return 'cpu' if _platform() == 'cpu' else 'plain'


def kv_layout() -> str:
  """The layout of keys and values (and of the KV cache) that `attention`
  takes: 'BSNH', or heads-major 'BNSH' for the CPU kernels."""
  return cpu.KV_LAYOUT if active() == 'cpu' else 'BSNH'


def einsum(spec: str, a: Array, b: Array) -> Array:
  """`jnp.einsum(spec, a, b)` (one letter per axis), on the active kernels."""
  if active() == 'cpu':
    return cpu.einsum(spec, a, b)
  return jnp.einsum(spec, a, b)


def _implementation(q: Array) -> Optional[str]:
  """cuDNN's fused kernel on GPU for 16-bit inputs, else XLA's
  (`implementation=None` means XLA in jax 0.10)."""
  if _platform() in ('gpu', 'cuda') and q.dtype in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return None


def attention(q: Array, k: Array, v: Array, *, bias: Optional[Array] = None,
              mask: Optional[Array] = None, scale: float = 1.0,
              dropout: Optional[Callable[[Array], Array]] = None) -> Array:
  """softmax(scale q.k + bias, masked) v -> [B,T,N,H] in q's dtype.

  q [B,T,N,H]; k, v in `kv_layout()`; `bias` additive, broadcastable to
  [B,N,T,S]; `mask` boolean [B|1,1,T|1,S] (True: may attend); `dropout`, if
  given, acts on the attention weights. Logits and softmax are float32.
  """
  if active() == 'cpu':
    return cpu.attention(q, k, v, bias=bias, mask=mask, scale=scale,
                         dropout=dropout)
  if dropout is None:
    implementation = _implementation(q)
    if implementation is not None:
      try:
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale,
            implementation=implementation)
      except (ValueError, NotImplementedError, RuntimeError):
        pass  # a shape, mask or bias the fused kernel does not take
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                        scale=scale)
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, cpu.MASK_LOGIT)
  weights = dropout(jax.nn.softmax(logits, axis=-1).astype(q.dtype))
  return jnp.einsum('BNTS,BSNH->BTNH', weights, v)
