"""Rotary position embeddings (RoPE), as Llama, Mistral and Qwen2 use them.

Queries and keys are rotated by angles position * theta^(-2i/H), in Hugging
Face's "rotate half" arrangement (the first and second halves of a head are
the two coordinates of each rotated pair), so HF query / key weights load
without permutation. `RopeScaling` is Llama 3's stretch of the long
wavelengths. Used by `layers.Attention` (its `rope_theta` / `rope_scaling`).
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's RoPE frequency scaling: wavelengths longer than
  `original_max_position_embeddings / low_freq_factor` are stretched by
  `factor`, those shorter than `.../ high_freq_factor` kept, and those between
  interpolated smoothly (HF's `rope_type='llama3'`)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Optional[RopeScaling] = None) -> np.ndarray:
  """[H/2] float32 inverse frequencies theta^(-2i/H), Llama-3-scaled if `scaling`."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is not None:
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((old / wavelen - scaling.low_freq_factor) /
              (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray, layout: str) -> Array:
  """`x` rotated by its positions, in Hugging Face's "rotate half" form.

  `x` has axes `layout` (e.g. 'BTNH'; 'B', the length axis 'T' or 'S', and
  'H' are read); `positions` [B|1, T]. The two halves of each head, x1 and x2,
  become x1 cos - x2 sin and x2 cos + x1 sin, with angles position *
  `inv_freq` (so HF's q/k projection weights load unpermuted). The angles are
  float32; the result has x's dtype.
  """
  length = 'T' if 'T' in layout else 'S'
  angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B,T,H]
  shape = [1] * len(layout)
  shape[layout.index('B')] = angles.shape[0]
  shape[layout.index(length)] = angles.shape[1]
  shape[layout.index('H')] = angles.shape[2]
  have = 'B' + length + 'H'
  angles = jnp.transpose(angles, [have.index(c) for c in sorted(have, key=layout.index)])
  cos = jnp.cos(angles).reshape(shape).astype(x.dtype)
  sin = jnp.sin(angles).reshape(shape).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=layout.index('H'))
  rotated = jnp.concatenate([-x2, x1], axis=layout.index('H'))
  return x * cos + rotated * sin
