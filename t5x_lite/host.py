"""Host tuning for a run: what the entry points apply before JAX and TensorFlow load.

    if __name__ == '__main__':  # at the top of an entry module, before its imports
      from t5x_lite import host
      host.prepare()

Importing t5x_lite, or any of its library modules, leaves the process as its
dependencies' imports leave it. `prepare` is the one place that changes it, for
a run started with `python -m t5x_lite.<entry point>` (or a script or notebook
that calls it first):

  * log levels: TF_CPP_MIN_LOG_LEVEL=2 unless set, and TensorFlow's start-up
    notices (oneDNN, CUDA probing, `failed call to cuInit`), which it prints
    whatever the level, are dropped while it loads;
  * platforms: the CPU when libtpu is installed on a host without an
    accelerator, unless JAX_PLATFORMS chooses;
  * TensorFlow sees no GPU: it only reads data, and would otherwise take
    device memory from JAX;
  * malloc: freed host memory is kept for reuse on a Linux host without an
    accelerator; `T5X_LITE_MALLOC=system` leaves malloc as it is.

What the heap so keeps is handed back by `release_free_memory()`, which
training calls after each checkpoint and evaluation; `available_memory()` is
what the train entry point compares XLA's estimate of a step with before the
first step.
"""

import contextlib
import ctypes
import glob
import importlib.util
import os
import re
import sys
import tempfile
from typing import Any, Iterator, Optional

# Device files of TPU chips (/dev/accel*, or /dev/vfio/N on v5e and later) and
# of NVIDIA (/dev/nvidia*, /dev/dxg under WSL) and AMD (/dev/kfd) GPUs.
TPU_DEVICES = ('/dev/accel*', '/dev/vfio/[0-9]*')
GPU_DEVICES = ('/dev/nvidia*', '/dev/dxg', '/dev/kfd')

# Lines TensorFlow writes to stderr on every start, whatever TF_CPP_MIN_LOG_LEVEL
# says: absl prints everything logged before its initialisation, and the cuInit
# failure of a host without a GPU comes from the device probe.
_START_UP_NOISE = re.compile(
    r'All log messages before absl::InitializeLog|oneDNN custom operations are on'
    r'|Could not find cuda drivers|cpu_feature_guard\.cc|To enable the following instructions'
    r'|Unable to register cu\w+ factory|failed call to cuInit|computation placer already registered'
    r'|TF-TRT Warning|Could not find TensorRT')

_malloc: Optional[str] = None  # the policy prepare() applied
_tensorflow_prepared = False


def host_has_tpu() -> bool:
  """Whether this host has TPU chips attached."""
  return any(glob.glob(pattern) for pattern in TPU_DEVICES)


def host_has_accelerator() -> bool:
  """Whether this host has TPU chips or GPUs attached."""
  return host_has_tpu() or any(glob.glob(pattern) for pattern in GPU_DEVICES)


def prepare(tensorflow: bool = True) -> str:
  """Tunes this process for a run (see the module docstring); call it first.

  Entry points call it before they import jax or TensorFlow: the environment
  variables it sets are read when those load. `tensorflow=False` (entry points
  that read no data through TensorFlow) leaves TensorFlow unloaded. Calling it
  again does nothing more. Returns the malloc policy, as `malloc_policy()`.
  """
  global _malloc, _tensorflow_prepared
  if _malloc is None:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    _prefer_cpu_without_accelerator()
    _malloc = 'reuse' if _reuse_freed_host_memory() else 'system'
  if tensorflow and not _tensorflow_prepared and importlib.util.find_spec('tensorflow'):
    with _without_start_up_noise():
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        tf.config.set_visible_devices([], 'GPU')
      except RuntimeError:  # TensorFlow has set up its devices already: too late to hide any
        pass
    _tensorflow_prepared = True
  return _malloc


def with_raised_stack_limit(module: str) -> None:
  """Runs this process again (`python -m module`, the same arguments) once,
  with the stack size limit raised to its hard limit, unless it is there
  already or T5X_LITE_KEEP_STACK_LIMIT is set.

  glibc sizes every thread's stack from the limit in force when the process
  starts, so raising it later does nothing; the TPU compiler that
  `precompile` drives recurses deep enough on long sequences (e.g. Llama-3.2-1B
  at 2048 tokens) to overflow the usual 8 MiB on its threads.
  """
  import resource  # pylint: disable=g-import-not-at-top
  soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if soft == hard or os.environ.get('T5X_LITE_KEEP_STACK_LIMIT'):
    return
  resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
  os.environ['T5X_LITE_KEEP_STACK_LIMIT'] = '1'  # (the new process keeps what it gets)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, '-m', module, *sys.argv[1:]])


def malloc_policy() -> str:
  """'reuse' when prepare() kept freed host memory in the heap, else 'system'
  (also when prepare() was not called: malloc is as glibc left it)."""
  return _malloc or 'system'


def _prefer_cpu_without_accelerator() -> None:
  """With libtpu installed (to compile for TPU slices, see t5x_lite.precompile)
  on a host without any accelerator, JAX would still start libtpu's TPU runtime,
  which prints initialisation errors and takes a host-wide lock file. Such a
  host has only its CPU: say so, unless JAX_PLATFORMS already chooses."""
  if importlib.util.find_spec('libtpu') is None:
    return
  if host_has_accelerator():
    return
  if 'JAX_PLATFORMS' in os.environ:
    return
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in sys.modules:  # imported first: its config has read the environment already
    jax = sys.modules['jax']
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
  shrink. Returns whether it applied.
  """
  if os.environ.get('T5X_LITE_MALLOC') == 'system' or host_has_accelerator():
    return False
  mallopt = _glibc('mallopt')
  if mallopt is None:
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0)
              and mallopt(m_trim_threshold, 2**31 - 1))


def _glibc(name: str) -> Optional[Any]:
  """glibc's function `name` on Linux; None elsewhere (or with musl, ...)."""
  if sys.platform != 'linux':
    return None
  try:
    return getattr(ctypes.CDLL('libc.so.6'), name)
  except (OSError, AttributeError):
    return None


def available_memory(meminfo: str = '/proc/meminfo',
                     cgroup: str = '/sys/fs/cgroup') -> Optional[int]:
  """Bytes of host memory this process can still take before the kernel
  swaps or its OOM killer ends it: the kernel's MemAvailable, or less where
  the process's memory cgroup (a container's limit, v2 or v1) leaves less.
  None where unknown (not Linux). Memory that malloc holds free for reuse
  counts as used: call `release_free_memory()` first."""
  try:
    with open(meminfo) as f:
      fields = dict(line.split(':', 1) for line in f if ':' in line)
    available = int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError, IndexError):
    return None
  left = _cgroup_memory_left(cgroup)
  return available if left is None else min(available, left)


def _cgroup_memory_left(root: str) -> Optional[int]:
  """A memory cgroup's limit less its usage, the inactive file cache (which
  the kernel reclaims first) not counted as used; None without a limit."""
  for limit_file, usage_file, inactive in (
      ('memory.max', 'memory.current', 'inactive_file'),  # v2
      ('memory/memory.limit_in_bytes', 'memory/memory.usage_in_bytes', 'total_inactive_file')):
    try:
      with open(os.path.join(root, limit_file)) as f:
        limit = f.read().strip()
      with open(os.path.join(root, usage_file)) as f:
        usage = int(f.read())
    except (OSError, ValueError):
      continue
    if not limit.isdigit() or int(limit) >= 2**60:  # 'max' (v2) or v1's unlimited
      return None
    stat_file = os.path.join(os.path.dirname(os.path.join(root, usage_file)), 'memory.stat')
    try:
      with open(stat_file) as f:
        stats = dict(line.split() for line in f if len(line.split()) == 2)
      usage -= int(stats.get(inactive, 0))
    except (OSError, ValueError):
      pass
    return max(int(limit) - usage, 0)
  return None


def release_free_memory() -> bool:
  """Hands the memory that glibc's malloc holds free back to the kernel
  (`malloc_trim`). Under the 'reuse' policy the heap never shrinks by itself;
  a run calls this where the step's memory is idle anyway (after a checkpoint
  or an evaluation, before measuring what is available). That slows the heap's
  growth without bounding it; `T5X_LITE_MALLOC=system` bounds it. The next
  step touches its temporaries' pages afresh once. Returns whether anything
  was released."""
  malloc_trim = _glibc('malloc_trim')
  return bool(malloc_trim and malloc_trim(0))


@contextlib.contextmanager
def _without_start_up_noise() -> Iterator[None]:
  """Sends what is written to stderr (file descriptor 2, where C++ libraries
  log) to a file meanwhile, then writes it back less the _START_UP_NOISE lines."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with tempfile.TemporaryFile(mode='w+b') as captured:
      os.dup2(captured.fileno(), 2)
      try:
        yield
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        captured.seek(0)
        kept = [line for line in captured.read().decode(errors='replace').splitlines(True)
                if not _START_UP_NOISE.search(line)]
        if kept:
          sys.stderr.write(''.join(kept))
          sys.stderr.flush()
  finally:
    os.close(saved)
