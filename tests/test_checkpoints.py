"""Checkpoint save → restore round trip, damage detection, params-only restore."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from t5x_lite import checkpoints
from t5x_lite import param_layout
from t5x_lite.errors import UserError


def _state(seed):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = {'dense': {'kernel': jax.random.normal(k1, (16, 8))},
            'norm': {'scale': jax.random.normal(k2, (8,)).astype(jnp.bfloat16)}}
  tx = optax.adafactor(1e-2)
  return {'step': jnp.asarray(seed, jnp.int32), 'params': params,
          'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(seed + 1)}


def _abstract(state):
  replicated = jax.sharding.NamedSharding(
      jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,)), jax.P())
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def _assert_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_keep_last(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), data_position=10 * step)
  ckpt.close()
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=2)
  assert ckpt.all_steps() == [2, 3]
  state, meta, iterator = ckpt.restore_latest(_abstract(_state(0)))
  assert iterator is None
  _assert_equal(state, _state(3))
  assert meta['step'] == 3 and meta['data_position'] == 30
  ckpt.close()


def test_no_checkpoint_gives_none(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  assert ckpt.restore_latest(_abstract(_state(0))) is None
  ckpt.close()


def _data_files(step_dir):
  files = []
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    files += [os.path.join(root, n) for n in names if os.path.getsize(os.path.join(root, n)) > 64
              and '/d/' in os.path.join(root, n) + '/']
  return sorted(files)


@pytest.mark.parametrize('damage', ['flip_bytes', 'delete_files'])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage, caplog):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=3)
  ckpt.save(1, _state(1), 1)
  ckpt.save(2, _state(2), 2)
  ckpt.close()
  files = _data_files(os.path.join(tmp_path, 'checkpoints', '2'))
  assert files, 'expected array data files in the checkpoint'
  for path in files:
    if damage == 'delete_files':
      os.remove(path)
    else:
      data = bytearray(open(path, 'rb').read())
      for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
      open(path, 'wb').write(bytes(data))
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=3)
  state, meta, _ = ckpt.restore_latest(_abstract(_state(0)))
  assert meta['step'] == 1
  _assert_equal(state, _state(1))
  assert any('checkpoints/2 is damaged' in r.getMessage() for r in caplog.records)
  ckpt.close()


def test_all_damaged_is_an_error(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(1, _state(1), 1)
  ckpt.close()
  for path in _data_files(os.path.join(tmp_path, 'checkpoints', '1')):
    os.remove(path)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  with pytest.raises(UserError, match='every checkpoint'):
    ckpt.restore_latest(_abstract(_state(0)))
  ckpt.close()


def test_restore_params_only(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(5, _state(5), 5)
  ckpt.close()
  abstract_params = _abstract(_state(0))['params']
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '5'):
    params = checkpoints.restore_params(str(path), abstract_params)
    _assert_equal(params, _state(5)['params'])
  wrong = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((3,) + x.shape, x.dtype, sharding=x.sharding),
      abstract_params)
  with pytest.raises(UserError, match='does not fit the model'):
    checkpoints.restore_params(str(tmp_path), wrong)
  with pytest.raises(UserError, match='no checkpoint found'):
    checkpoints.restore_params(str(tmp_path / 'nothing'), abstract_params)


def _numbers(start):
  ds = tf.data.Dataset.range(start, 1000).shuffle(50, seed=0).batch(4).prefetch(2)
  return ds


def test_data_iterator_is_saved_and_restored(tmp_path):
  ds = _numbers(0)
  iterator = iter(ds)
  for _ in range(5):
    next(iterator)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(5, _state(5), data_position=5, data_iterator=iterator)
  expected = [next(iterator).numpy() for _ in range(3)]
  ckpt.close()
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  _, meta, restored = ckpt.restore_latest(_abstract(_state(0)), lambda: iter(ds))
  assert meta['data_iterator'] and meta['data_position'] == 5
  np.testing.assert_array_equal([next(restored).numpy() for _ in range(3)], expected)
  ckpt.close()


def test_uncheckpointable_iterator_is_left_out(tmp_path, caplog):
  ds = tf.data.Dataset.from_generator(lambda: iter(range(100)), output_signature=tf.TensorSpec((), tf.int64))
  iterator = iter(ds)
  next(iterator)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(1, _state(1), data_position=1, data_iterator=iterator)
  ckpt.close()
  assert any('cannot be checkpointed' in r.getMessage() for r in caplog.records)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  _, meta, restored = ckpt.restore_latest(_abstract(_state(0)), lambda: iter(ds))
  assert restored is None and not meta['data_iterator'] and meta['data_position'] == 1
  ckpt.close()


def test_restore_params_converts_between_loop_and_scanned_layers(tmp_path):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  loop = {'layers_0': {'w': jax.random.normal(k[0], (4, 3))},
          'layers_1': {'w': jax.random.normal(k[1], (4, 3))},
          'norm': {'scale': jax.random.normal(k[2], (3,))}}
  scanned = param_layout.stack_layers(loop)
  for saved, wanted in ((loop, scanned), (scanned, loop)):
    directory = tmp_path / str(len(saved))
    ckpt = checkpoints.Checkpointer(str(directory), save_period=1)
    ckpt.save(1, {'step': jnp.asarray(1), 'params': saved, 'opt_state': {},
                  'rng': jax.random.PRNGKey(0)}, 1)
    ckpt.close()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wanted)
    restored = checkpoints.restore_params(str(directory), abstract)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(wanted)
    _assert_equal(restored, wanted)
