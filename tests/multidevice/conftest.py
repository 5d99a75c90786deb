"""Tests on 8 fake CPU devices, which must be asked for before jax starts.

tests/test_layouts.py runs this directory in a pytest process of its own:

    python -m pytest --confcutdir=tests/multidevice tests/multidevice

(`--confcutdir` keeps tests/conftest.py, which imports jax, out of it). The
main suite does not collect this directory: it would have one device.
"""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
DEVICES = 8
# Many small compilations: skip LLVM's slow passes and emit fusions with the
# loop emitters, as tests/conftest.py does (results differ only in rounding).
XLA_FLAGS = (f'--xla_force_host_platform_device_count={DEVICES}'
             ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
             ' --xla_cpu_use_fusion_emitters=false')

if 'jax' not in sys.modules and '--xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
sys.path.insert(0, TESTS)  # families.py

from t5x_lite import host  # pylint: disable=g-import-not-at-top

host.prepare()

import jax  # pylint: disable=g-import-not-at-top

if jax.device_count() != DEVICES:
  raise pytest.UsageError(
      f'tests/multidevice needs {DEVICES} devices, this process has {jax.device_count()}: '
      'run it through tests/test_layouts.py, or as `python -m pytest '
      '--confcutdir=tests/multidevice tests/multidevice` with XLA_FLAGS='
      f'--xla_force_host_platform_device_count={DEVICES} (jax had started before it was set).')
