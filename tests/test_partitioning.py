"""Meshes from config, layout errors before compiling, sharded params and batches."""

import flax.linen as nn
import jax
import pytest

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

