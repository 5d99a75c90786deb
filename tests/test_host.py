"""Host tuning: nothing on import, everything in host.prepare() where a run starts.

Each check runs in a fresh interpreter, since the test process itself has been
prepared (conftest.py).
"""

import ctypes
import json
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_T5, run_env
from t5x_lite import host

_LINUX_GLIBC = sys.platform.startswith('linux') and hasattr(ctypes.CDLL(None), 'mallinfo2')
_POLICY_APPLIES = _LINUX_GLIBC and not host.host_has_accelerator()

# Whether glibc serves a 256 MiB block with a mapping of its own (its default:
# over the mmap threshold) or from the heap (after mallopt(M_MMAP_MAX, 0)).
_MAPS_A_LARGE_BLOCK = '''
import ctypes
class _Mallinfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
      'fordblks', 'keepcost')]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = _Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def maps_a_large_block():
  size = 256 << 20
  before = libc.mallinfo2().hblkhd
  block = libc.malloc(size)
  mapped = libc.mallinfo2().hblkhd - before >= size
  libc.free(block)
  return mapped
'''


def _env(**extra):
  """The tests' subprocess environment without what prepare() would set."""
  env = {k: v for k, v in run_env().items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'T5X_LITE_MALLOC')}
  env.update(extra)
  return env


def _run_python(code, env):
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_IMPORTS = _MAPS_A_LARGE_BLOCK + '''
import json, os
import flax, jax, optax, orbax.checkpoint, seqio, tensorflow as tf, tensorflow_datasets
hidden = []
tf.config.set_visible_devices = lambda *args, **kwargs: hidden.append(args)
def snapshot():
  return {'environ': dict(os.environ), 'maps_a_large_block': maps_a_large_block(),
          'jax_platforms': jax.config.jax_platforms}
before = snapshot()
import t5x_lite, t5x_lite.hf, t5x_lite.host, t5x_lite.data.pipeline, t5x_lite.train
after = snapshot()
print(json.dumps({'before': before, 'after': after, 'hidden': len(hidden)}))
'''


@pytest.mark.skipif(not _LINUX_GLIBC, reason='reads glibc malloc statistics (mallinfo2)')
def test_import_leaves_the_process_as_it_was():
  out = _run_python(_IMPORTS, _env())
  before, after = out['before'], out['after']
  assert before['maps_a_large_block'], 'glibc mmaps a 256 MiB block by default'
  assert after['maps_a_large_block'], 'importing t5x_lite changed malloc'
  changed = {k for k in set(before['environ']) | set(after['environ'])
             if before['environ'].get(k) != after['environ'].get(k)}
  assert not changed, {k: (before['environ'].get(k), after['environ'].get(k)) for k in changed}
  assert before['jax_platforms'] == after['jax_platforms']
  assert out['hidden'] == 0, 'importing t5x_lite changed the devices TensorFlow sees'


_PREPARE = _MAPS_A_LARGE_BLOCK + '''
import json, os
from t5x_lite import host
policy = host.prepare(tensorflow=False)
print(json.dumps({'policy': policy, 'again': host.prepare(tensorflow=False),
                  'reported': host.malloc_policy(), 'maps_a_large_block': maps_a_large_block(),
                  'TF_CPP_MIN_LOG_LEVEL': os.environ.get('TF_CPP_MIN_LOG_LEVEL')}))
'''


@pytest.mark.skipif(not _POLICY_APPLIES,
                    reason='the policy applies on Linux (glibc) hosts without accelerators')
def test_prepare_applies_the_malloc_policy_unless_opted_out():
  out = _run_python(_PREPARE, _env())
  assert out == {'policy': 'reuse', 'again': 'reuse', 'reported': 'reuse',
                 'maps_a_large_block': False, 'TF_CPP_MIN_LOG_LEVEL': '2'}, out
  out = _run_python(_PREPARE, _env(T5X_LITE_MALLOC='system'))
  assert out == {'policy': 'system', 'again': 'system', 'reported': 'system',
                 'maps_a_large_block': True, 'TF_CPP_MIN_LOG_LEVEL': '2'}, out


def test_malloc_policy_is_system_until_prepared():
  code = 'import json; from t5x_lite import host; print(json.dumps(host.malloc_policy()))'
  assert _run_python(code, _env()) == 'system'


_FAULTS = '''
import ctypes, resource
from t5x_lite import host
policy = host.prepare(tensorflow=False)
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def touch_and_free():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
touch_and_free()  # the first touch faults in every policy
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  touch_and_free()
print(policy, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not _POLICY_APPLIES,
                    reason='the policy applies on Linux (glibc) hosts without accelerators')
def test_freed_host_memory_is_reused_without_page_faults():
  """A 64 MiB block freed and allocated again five times: with the policy it
  stays in the heap (no new faults); glibc's default maps it afresh each time,
  faulting in all 16,384 of its 4 KiB pages (fewer with huge pages)."""
  counts = {}
  for policy in ('', 'system'):
    out = subprocess.run([sys.executable, '-c', _FAULTS], cwd=REPO,
                         env=_env(T5X_LITE_MALLOC=policy), check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    counts[out[0]] = int(out[1])
  assert set(counts) == {'reuse', 'system'}, counts
  assert counts['reuse'] < 200, counts
  assert counts['system'] > 10 * max(counts['reuse'], 1), counts


_START_UP_NOISE = ('cuInit', 'TF_CPP', 'oneDNN', 'Unable to register cu', 'cuda drivers',
                   'absl::InitializeLog', 'cpu_feature_guard', 'TPU', 'libtpu')


@pytest.mark.skipif(host.host_has_accelerator(), reason='this host has an accelerator')
def test_entry_point_starts_quietly_on_a_cpu_host():
  """infer loads TensorFlow and jax, starts the CPU backend and builds the task,
  then stops at the missing checkpoint: its stderr is that one error."""
  proc = subprocess.run(
      [sys.executable, '-m', 't5x_lite.infer', *SMALL_T5, '--gin_file=configs/runs/infer.gin',
       "--gin.MODEL_DIR='/nonexistent'", "--gin.CHECKPOINT_PATH='/nonexistent/checkpoints/1'",
       "--gin.MIXTURE_OR_TASK_NAME='embedded_span_corruption'",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'error: ' in proc.stderr
  noise = [line for line in proc.stderr.splitlines() if any(n in line for n in _START_UP_NOISE)]
  assert not noise, proc.stderr[-3000:]
