"""Host tuning: nothing on import, everything in host.prepare() where a run starts.

Each check runs in a fresh interpreter, since the test process itself has been
prepared (conftest.py).
"""

import ast
import ctypes
import json
import os
import subprocess
import sys

import jax
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


# Entry points: modules run with `python -m`, whose `__main__` section must call
# host.prepare() before anything but the standard library is imported.
_ENTRY_POINTS = ('train', 'eval', 'infer', 'precompile', 'benchmark', 'show_task',
                 'self_instruct', 'layout_bench', 'decode_bench', 'import_hf',
                 'precompute_reference')


@pytest.mark.parametrize('name', _ENTRY_POINTS)
def test_entry_point_prepares_the_host_before_its_imports(name):
  """Read from the source: prepare() is what drops TensorFlow's start-up lines
  (see test_entry_point_starts_quietly_on_a_cpu_host), so it must run before
  jax, TensorFlow or any module that loads them."""
  path = os.path.join(REPO, 't5x_lite', f'{name}.py')
  tree = ast.parse(open(path).read())
  before = []
  for stmt in tree.body:
    if (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare)
        and getattr(stmt.test.left, 'id', None) == '__name__'):
      calls = [n for n in ast.walk(stmt) if isinstance(n, ast.Call)
               and getattr(n.func, 'attr', None) == 'prepare'
               and getattr(n.func.value, 'id', None) == 'host']
      if calls:
        break
    for node in ast.walk(stmt):
      if isinstance(node, ast.Import):
        before += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        before.append(node.module)
  else:
    pytest.fail(f't5x_lite/{name}.py never calls host.prepare() under __main__')
  third_party = [m for m in before if m.split('.')[0] not in sys.stdlib_module_names]
  assert not third_party, f'{name} imports {third_party} before host.prepare()'


def test_available_memory_reads_meminfo_and_the_cgroup(tmp_path):
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal:       16000000 kB\nMemFree:          100000 kB\n'
                     'MemAvailable:    8000000 kB\nBuffers:           20000 kB\n')
  cgroup = tmp_path / 'cgroup'
  cgroup.mkdir()
  assert host.available_memory(str(meminfo), str(cgroup)) == 8000000 * 1024  # no cgroup files
  # cgroup v2 with a 4 GiB limit, 3 GiB used of which 0.5 GiB inactive file cache.
  (cgroup / 'memory.max').write_text('4294967296\n')
  (cgroup / 'memory.current').write_text('3221225472\n')
  (cgroup / 'memory.stat').write_text('anon 2147483648\ninactive_file 536870912\n')
  assert host.available_memory(str(meminfo), str(cgroup)) == 1610612736
  (cgroup / 'memory.max').write_text('max\n')
  assert host.available_memory(str(meminfo), str(cgroup)) == 8000000 * 1024
  # cgroup v1 without a limit (the kernel's largest page-aligned value).
  for name in ('memory.max', 'memory.current', 'memory.stat'):
    (cgroup / name).unlink()
  (cgroup / 'memory').mkdir()
  (cgroup / 'memory' / 'memory.limit_in_bytes').write_text('9223372036854771712\n')
  (cgroup / 'memory' / 'memory.usage_in_bytes').write_text('12110565376\n')
  assert host.available_memory(str(meminfo), str(cgroup)) == 8000000 * 1024
  (cgroup / 'memory' / 'memory.limit_in_bytes').write_text('2147483648\n')
  (cgroup / 'memory' / 'memory.stat').write_text('cache 10\ntotal_inactive_file 1073741824\n')
  (cgroup / 'memory' / 'memory.usage_in_bytes').write_text('2147483648\n')
  assert host.available_memory(str(meminfo), str(cgroup)) == 1073741824
  assert host.available_memory(str(tmp_path / 'absent'), str(cgroup)) is None


_RELEASE = _MAPS_A_LARGE_BLOCK + '''
import ctypes, json, os
from t5x_lite import host
host.prepare(tensorflow=False)
def rss():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
size = 256 << 20
start = rss()
big = libc.malloc(size)
ctypes.memset(big, 1, size)
kept = libc.malloc(4096)  # above the big block: the freed block is inside the heap
libc.free(big)
freed = rss()
released = host.release_free_memory()
print(json.dumps({'kept': freed - start, 'released': freed - rss(), 'returned': released,
                  'maps_a_large_block': maps_a_large_block()}))
'''


@pytest.mark.skipif(not _POLICY_APPLIES,
                    reason='the policy applies on Linux (glibc) hosts without accelerators')
def test_release_free_memory_returns_what_the_heap_keeps():
  """A touched 256 MiB block freed below a live one stays resident under the
  policy; release_free_memory() hands its pages back, and the policy stays."""
  out = _run_python(_RELEASE, _env())
  assert out['kept'] > 250 << 20, out
  assert out['released'] > 250 << 20, out
  assert out['returned'] is True and out['maps_a_large_block'] is False, out


def test_a_step_that_cannot_fit_stops_in_one_line(monkeypatch):
  """XLA's estimate of what a compiled step allocates beyond its arguments
  against the available host memory: exactly at it the run goes on; one byte
  less and it stops with one line naming both and the fix."""
  import families  # pylint: disable=g-import-not-at-top
  from t5x_lite import optimizers  # pylint: disable=g-import-not-at-top
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  from t5x_lite import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  from t5x_lite.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  model = families.tiny('gpt')
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in families.random_batch(model, 4).items()}
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-3), Partitioner(), shapes)
  analysis = trainer.train_step.memory_analysis()
  memory = trainer.memory()
  assert memory.temp_bytes == analysis.temp_size_in_bytes > 0
  needed = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes)
  assert memory.running_bytes == needed
  assert memory.total_bytes == needed + analysis.argument_size_in_bytes + (
      analysis.generated_code_size_in_bytes)
  monkeypatch.setattr(host, 'available_memory', lambda: needed)
  train.check_host_memory(trainer)
  monkeypatch.setattr(host, 'available_memory', lambda: needed - 1)
  with pytest.raises(UserError) as error:
    train.check_host_memory(trainer)
  message = str(error.value)
  assert '\n' not in message
  assert message == (
      f'the train step needs about {needed / 2**20:.1f} MiB of host memory beyond the train '
      f"state (XLA's estimate for 1 CPU device(s)) and {(needed - 1) / 2**20:.1f} MiB is "
      "available; lower BATCH_SIZE, raise NUM_MICROBATCHES, or set the model config's "
      "remat_policy = 'full'.")


def test_raised_stack_limit_reaches_a_new_process(tmp_path):
  """with_raised_stack_limit runs the module again (same arguments) with the
  soft stack limit at the hard one; that run does not go round again."""
  import resource  # pylint: disable=g-import-not-at-top
  _, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if hard != resource.RLIM_INFINITY and hard <= 8 << 20:
    pytest.skip('the hard stack limit leaves nothing to raise')
  (tmp_path / 'stack_probe.py').write_text(
      'import resource, sys\n'
      'from t5x_lite import host\n'
      "print('start', sys.argv[1:], flush=True)\n"
      "host.with_raised_stack_limit('stack_probe')\n"
      "print('limit', resource.getrlimit(resource.RLIMIT_STACK)[0])\n")
  env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{REPO}')
  env.pop('T5X_LITE_KEEP_STACK_LIMIT', None)
  low = lambda: resource.setrlimit(resource.RLIMIT_STACK, (8 << 20, hard))
  out = subprocess.run([sys.executable, '-m', 'stack_probe', 'x', '--y=1'], env=env, cwd=tmp_path,
                       preexec_fn=low, capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == ["start ['x', '--y=1']", "start ['x', '--y=1']", f'limit {hard}']
