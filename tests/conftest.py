"""Shared helpers: run the train entry point in a subprocess on a very small T5;
`require_shared_data` / `require` for what a test needs beyond the package."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

# The suite compiles hundreds of small programs, where LLVM's optimisation of
# the generated code costs more than it saves: skip its slow passes, and emit
# fusions with XLA:CPU's loop emitters (the newer fusion emitters take over
# twice the compile time on these programs), in the test processes and the
# entry points they start (results differ only in rounding).
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
                      ' --xla_cpu_use_fusion_emitters=false')
if FAST_COMPILE_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

from t5x_lite import host  # pylint: disable=g-import-not-at-top

# The test processes run as an entry point does (the CPU platform where libtpu
# finds no chip, quiet TensorFlow, the malloc policy), set before jax loads.
host.prepare()

import jax
import pytest
from flax import linen as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), 'shared', 'data')

# Tests on 8 fake devices run in a process of their own (tests/test_layouts.py).
collect_ignore = ['multidevice']


def _missing(what: str) -> None:
  """Skips the test, or fails it where the CI environment variable is set
  (a CI run must not pass by skipping what it was meant to test)."""
  if os.environ.get('CI'):
    pytest.fail(f'{what}; CI is set, so this fails instead of skipping.', pytrace=False)
  pytest.skip(what, allow_module_level=True)


def require_shared_data(*parts: str) -> str:
  """The path SHARED_DATA/parts..., which must exist: skips the test if it
  does not (fails it under CI)."""
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    _missing(f'needs {path} (the shared data next to the repo)')
  return path


def require(module: str):
  """Imports `module` (a test extra: pip install -e '.[test]'): skips the test
  if it is not installed (fails it under CI)."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    _missing(f"needs {module} ({e}); install the test extras: pip install -e '.[test]'")


# The processes the tests start share one persistent compilation cache, made
# for this test session (the xdist workers inherit it): entry points that run
# the same small model compile its programs once. A cached program is the same
# executable, so no result changes.
_CACHE_ENV = 'T5X_LITE_TEST_COMPILATION_CACHE'
_own_cache = None
if not os.environ.get(_CACHE_ENV):
  _own_cache = tempfile.mkdtemp(prefix='t5x_lite_tests_jax_cache_')
  os.environ[_CACHE_ENV] = _own_cache
# The embedded corpus, built once (by whichever process needs it first) and
# read back by the others from a file next to that cache (see corpus.CACHE_ENV).
if not os.environ.get('T5X_LITE_CORPUS_CACHE'):
  os.environ['T5X_LITE_CORPUS_CACHE'] = os.path.join(os.environ[_CACHE_ENV], 'corpus.json')


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: a test that runs for most of a minute or more; starts first')


def pytest_unconfigure(config):
  del config
  if _own_cache:
    shutil.rmtree(_own_cache, ignore_errors=True)


# Modules whose tests share an expensive module fixture (a trained run, the
# TPU compilations): under `make test` each runs whole on one xdist worker,
# which builds the fixture once. Every other test is scheduled on its own.
ONE_WORKER_MODULES = frozenset({'test_train.py', 'test_precompile.py', 'test_infer.py',
                                'test_export_hf.py'})


def _unit(nodeid: str) -> str:
  """What `make test` hands to a worker at once: a module of
  ONE_WORKER_MODULES, else the test alone."""
  path = nodeid.split('::', 1)[0]
  return path if os.path.basename(path) in ONE_WORKER_MODULES else nodeid


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` start first (with the rest of their unit), the others
  keep their order: `make test` hands tests to its two workers in this order,
  so that neither is left running a long test alone at the end."""
  del config
  first = {_unit(item.nodeid) for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: _unit(item.nodeid) not in first)


@pytest.hookimpl(optionalhook=True)  # known only where xdist is installed
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadgroup` (make test) by `_unit`. (xdist's own grouping by the
  xdist_group mark renames test ids in a way pytest 9 ignores, so it groups
  nothing here.)"""
  if config.getvalue('dist') != 'loadgroup':
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=g-import-not-at-top

  class UnitScheduling(LoadGroupScheduling):
    def _split_scope(self, nodeid):
      return _unit(super()._split_scope(nodeid))

  return UnitScheduling(config, log)


# A T5.1.1 small enough that a step takes milliseconds, on the embedded corpus.
SMALL_T5 = [
    '--gin_file=gin/t5_tiny_span.gin',
    '--gin.encoder_decoder.T5Config.emb_dim=32',
    '--gin.encoder_decoder.T5Config.num_heads=2',
    '--gin.encoder_decoder.T5Config.head_dim=16',
    '--gin.encoder_decoder.T5Config.mlp_dim=64',
    '--gin.encoder_decoder.T5Config.num_encoder_layers=2',
    '--gin.encoder_decoder.T5Config.num_decoder_layers=2',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.BATCH_SIZE=8',
    '--gin.train_script.train.log_every=1',
    '--gin.train_script.train.progress_bar=False',
]


def train_cmd(model_dir, *extra):
  return [sys.executable, '-m', 't5x_lite.train', *SMALL_T5,
          f"--gin.MODEL_DIR='{model_dir}'", *extra]


def run_env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}'
  env['JAX_COMPILATION_CACHE_DIR'] = os.environ[_CACHE_ENV]
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return env


def run_train(model_dir, *extra, devices=1, check=True):
  proc = subprocess.run(train_cmd(model_dir, *extra), cwd=REPO, env=run_env(devices),
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-5000:]}')
  return proc


def main_in_process(module, argv):
  """An entry point's main(argv) in this process, with gin's global config and
  the data settings it binds reset around it (so nothing leaks to other tests)."""
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import settings  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  try:
    return module.main(argv)
  finally:
    gin.clear_config(clear_constants=True)
    settings.use()


def read_metrics(model_dir):
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def repo():
  return REPO


def assert_logical_names(model, batch, allowed, unnamed_last_axis=()):
  """Every parameter has one logical name per axis, each from `allowed`.

  Parameters whose path contains a string of `unnamed_last_axis` may leave
  their last axis unnamed (replicated)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
  specs = nn.get_partition_spec(abstract)['params']
  shapes = nn.unbox(abstract)['params']
  flat_specs = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  assert len(flat_specs) == len(flat_shapes) > 0
  for (path, spec), shape in zip(flat_specs, flat_shapes):
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == len(shape.shape), path
    names = tuple(spec)
    if any(part in jax.tree_util.keystr(path) for part in unnamed_last_axis):
      names = names[:-1]
    assert all(name in allowed for name in names), (path, spec)


@pytest.fixture(params=['cpu', 'plain'])
def kernels(request):
  """Runs a test once on each model kernel setting (see t5x_lite.ops)."""
  from t5x_lite import ops  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # the setting is read when a function is traced
  with ops.use_kernels(request.param):
    yield request.param
  jax.clear_caches()
