"""t5x_lite: pretrain, fine-tune, post-train and evaluate Transformers in JAX/Flax."""

__version__ = "0.1.0"

import glob as _glob
import importlib.util as _importlib_util
import os as _os
import sys as _sys

# TensorFlow is used only for input pipelines; keep its C++ start-up chatter
# (CUDA probing, oneDNN notices) off the console unless asked for.
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Device files of TPU chips (/dev/accel*, or /dev/vfio/N on v5e and later) and
# of NVIDIA (/dev/nvidia*, /dev/dxg under WSL) and AMD (/dev/kfd) GPUs.
_TPU_DEVICES = ('/dev/accel*', '/dev/vfio/[0-9]*')
_GPU_DEVICES = ('/dev/nvidia*', '/dev/dxg', '/dev/kfd')


def host_has_tpu() -> bool:
  """Whether this host has TPU chips attached."""
  return any(_glob.glob(pattern) for pattern in _TPU_DEVICES)


def host_has_accelerator() -> bool:
  """Whether this host has TPU chips or GPUs attached."""
  return host_has_tpu() or any(_glob.glob(pattern) for pattern in _GPU_DEVICES)


def _prefer_cpu_without_accelerator() -> None:
  """With libtpu installed (to compile for TPU slices, see t5x_lite.precompile)
  on a host without any accelerator, JAX would still start libtpu's TPU runtime,
  which prints initialisation warnings and takes a host-wide lock file. Such a
  host has only its CPU: say so, unless JAX_PLATFORMS already chooses."""
  if _importlib_util.find_spec('libtpu') is None:
    return
  if host_has_accelerator():
    return
  if 'JAX_PLATFORMS' in _os.environ:
    return
  _os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in _sys.modules:  # imported first: its config has read the environment already
    jax = _sys.modules['jax']
    if jax.config.jax_platforms is None:
      jax.config.update('jax_platforms', 'cpu')


def _reuse_freed_host_memory() -> bool:
  """On a Linux host with no accelerator, keep memory that glibc's malloc frees
  for reuse instead of handing it back to the kernel.

  XLA:CPU allocates a step's temporaries afresh at every step. By default glibc
  serves each one over 32 MiB (and, on XLA's worker threads, smaller ones too)
  with a new mmap, so the step first spends its time faulting in zeroed pages:
  about a quarter of the bench model's train step. One malloc arena without
  mmap keeps those blocks in the heap, at the price of a heap that does not
  shrink. `T5X_LITE_MALLOC=system` leaves malloc as it is. Returns whether it
  applied.
  """
  if (_sys.platform != 'linux' or _os.environ.get('T5X_LITE_MALLOC') == 'system'
      or host_has_accelerator()):
    return False
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # not glibc (musl, ...)
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0)
              and mallopt(m_trim_threshold, 2**31 - 1))


_prefer_cpu_without_accelerator()
# 'reuse' or 'system': see _reuse_freed_host_memory (the benchmark reports it).
HOST_MALLOC = 'reuse' if _reuse_freed_host_memory() else 'system'
