"""Meshes from config, layout errors before compiling, sharded params and batches."""

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import pytest

from conftest import REPO, run_env
from t5x_lite.errors import UserError
from t5x_lite.partitioning import RULE_SETS, Partitioner


def test_one_device_mesh():
  p = Partitioner()
  assert dict(p.mesh.shape) == {'data': 1, 'fsdp': 1, 'model': 1}
  assert p.data_axes == ('data', 'fsdp')
  assert p.batch_sharding().spec == jax.P(('data', 'fsdp'))
  p.check_batch_size(3)


def test_two_axis_mesh_keeps_working():
  """A ('data', 'model') mesh (configs written before 'fsdp'): the built-in
  sets drop 'fsdp' from the batch axes; a set that shards over it is an error."""
  p = Partitioner((1, 1), rules='model_parallel')
  assert dict(p.mesh.shape) == {'data': 1, 'model': 1}
  assert dict(p.rules)['batch'] == 'data' and dict(p.rules)['mlp'] == 'model'
  assert p.batch_sharding().spec == jax.P('data')
  with pytest.raises(UserError, match=r"\('embed', 'fsdp'\) names a mesh axis"):
    Partitioner((1, 1), rules='fsdp')


def test_rule_sets():
  """Hand-written expectations for where each set puts the large axes."""
  expected = {  # logical axis -> mesh axes, for the axes the sets differ on
      'data_parallel': dict(embed=None, vocab=None, mlp=None, heads=None, joined_kv=None),
      'fsdp': dict(embed='fsdp', vocab=None, mlp=None, heads=None, joined_kv=None),
      'model_parallel': dict(embed=None, vocab='model', mlp='model', heads='model',
                             joined_kv='model'),
      'fsdp_model_parallel': dict(embed='fsdp', vocab='model', mlp='model', heads='model',
                                  joined_kv='model'),
  }
  assert sorted(RULE_SETS) == sorted(expected)
  for name, want in expected.items():
    rules = dict(RULE_SETS[name])
    assert rules['batch'] == ('data', 'fsdp'), name
    assert {k: rules[k] for k in want} == want, name
    assert rules['kv'] is None and rules['length'] is None, name
  # An activation's 'embed' is not sharded under FSDP: its batch takes 'fsdp'.
  fsdp = Partitioner(rules='fsdp')
  assert nn.logical_to_mesh_axes(('batch', 'length', 'embed'), fsdp.rules) == jax.P(
      ('data', 'fsdp'), None, None)
  assert nn.logical_to_mesh_axes(('vocab', 'embed'), fsdp.rules) == jax.P(None, 'fsdp')


@pytest.mark.parametrize('shape, match', [
    ((2, 1, 1), 'needs 2 devices but 1 are available'),
    ((-1, -1, 1), 'more than one -1'),
    ((1,), 'differ in length'),
])
def test_bad_meshes(shape, match):
  with pytest.raises(UserError, match=match):
    Partitioner(mesh_shape=shape)


def test_bad_rules():
  with pytest.raises(UserError, match='unknown rule set'):
    Partitioner(rules='tensor_parallel_3d')
  with pytest.raises(UserError, match="names a mesh axis"):
    Partitioner(rules=[('batch', 'replica')])


EIGHT_DEVICES = textwrap.dedent('''
    from t5x_lite.errors import UserError
    from t5x_lite.partitioning import Partitioner

    def expect_error(fn, text):
      try:
        fn()
      except UserError as e:
        assert text in str(e), str(e)
      else:
        raise AssertionError('no error: ' + text)

    assert dict(Partitioner().mesh.shape) == {'data': 8, 'fsdp': 1, 'model': 1}
    assert dict(Partitioner((-1, 2, 2)).mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
    assert dict(Partitioner((4, -1)).mesh.shape) == {'data': 4, 'model': 2}
    assert Partitioner((2, 2, 2), rules='fsdp').data_parallel_size == 4
    assert Partitioner((4, 2), rules='model_parallel').data_parallel_size == 4
    expect_error(lambda: Partitioner((3, -1, 1)), 'do not divide the 8')
    expect_error(lambda: Partitioner((16, 1, 1)), 'needs 16 devices but 8')
    expect_error(lambda: Partitioner().check_batch_size(12),
                 'not divisible by the data-parallel size 8')
    print('OK')
''')


def test_eight_fake_devices():
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICES], cwd=REPO, env=run_env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stdout + proc.stderr[-5000:]
