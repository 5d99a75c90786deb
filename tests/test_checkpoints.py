"""Checkpoint save → restore round trip, damage detection, params-only restore,
and the faults around them: damaged files, a changed model config, storage
errors on read, write and creation."""

import errno
import glob
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from etils import epath

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


def digest_files(directory):
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  return out


def fail_writes(monkeypatch, under, code):
  """Makes writing the tree metadata (`_METADATA`) of a save whose path
  contains `under` fail with OSError `code`, at the storage layer orbax writes
  its metadata through (etils' paths). Orbax writes it once the array data is
  on disk, so the save fails partway, as on a disk that fills up during it."""
  cls = type(epath.Path('/'))
  for name in ('write_text', 'write_bytes'):
    def failing(self, *args, _original=getattr(cls, name), **kwargs):
      if under in str(self) and str(self).endswith(f'{os.sep}_METADATA'):
        raise OSError(code, os.strerror(code), str(self))
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, failing)


def deny_writes(monkeypatch, directory):
  """`directory` becomes unwritable: chmod where that stops writes; as root,
  where it does not, creating files or directories under it is refused with
  EACCES (injected into os.mkdir / os.open)."""
  if os.geteuid() != 0:
    for root, _, _ in os.walk(directory):
      os.chmod(root, 0o555)
    return
  for name in ('mkdir', 'open'):
    def denied(path, *args, _original=getattr(os, name), **kwargs):
      if os.fspath(path).startswith(os.fspath(directory)):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
      return _original(path, *args, **kwargs)
    monkeypatch.setattr(os, name, denied)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(path):
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


_DAMAGE = {
    'flip_bytes': lambda step_dir: [_flip(p) for p in _data_files(step_dir)],
    'truncate_files': lambda step_dir: [_truncate(p) for p in _data_files(step_dir)],
    'delete_files': lambda step_dir: [os.remove(p) for p in _data_files(step_dir)],
    'delete_tree_metadata': lambda step_dir: os.remove(os.path.join(step_dir, 'state', '_METADATA')),
    'delete_meta': lambda step_dir: os.remove(os.path.join(step_dir, 'meta', 'metadata')),
}


@pytest.mark.parametrize('damage', sorted(_DAMAGE))
def test_damaged_latest_is_moved_aside_and_training_goes_past_it(tmp_path, damage, caplog):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=3)
  ckpt.save(1, _state(1), 1)
  ckpt.save(2, _state(2), 2)
  ckpt.close()
  step_dir = os.path.join(tmp_path, 'checkpoints', '2')
  assert _data_files(step_dir), 'expected array data files in the checkpoint'
  _DAMAGE[damage](step_dir)
  damaged = digest_files(step_dir)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=3)
  state, meta, _ = ckpt.restore_latest(_abstract(_state(0)))
  assert meta['step'] == 1
  _assert_equal(state, _state(1))
  [aside] = glob.glob(f'{step_dir}.damaged-*')
  assert digest_files(aside) == damaged  # kept as it was, for inspection
  assert ckpt.all_steps() == [1]
  assert any(f'checkpoint {step_dir} is damaged (' in r.getMessage()
             and f'moved it to {aside} ' in r.getMessage() for r in caplog.records)
  ckpt.save(2, _state(2), 2)  # past the damaged step: no "step already exists"
  ckpt.save(3, _state(3), 3)
  ckpt.close()
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=3)
  state, meta, _ = ckpt.restore_latest(_abstract(_state(0)))
  assert meta['step'] == 3 and ckpt.all_steps() == [1, 2, 3]
  _assert_equal(state, _state(3))
  ckpt.close()


def test_all_damaged_is_an_error_then_a_fresh_start(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(1, _state(1), 1)
  ckpt.close()
  for path in _data_files(os.path.join(tmp_path, 'checkpoints', '1')):
    os.remove(path)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  with pytest.raises(UserError, match=r'every checkpoint in .*/checkpoints is damaged '
                     r'\(moved aside: 1\.damaged-.*re-run to start from step 0'):
    ckpt.restore_latest(_abstract(_state(0)))
  assert ckpt.restore_latest(_abstract(_state(0))) is None
  ckpt.close()


def _changed_model(abstract):
  """The abstract state of a model whose config changed: a wider kernel, a new layer."""
  kernel = abstract['params']['dense']['kernel']
  params = dict(abstract['params'],
                dense={'kernel': jax.ShapeDtypeStruct((16, 12), kernel.dtype, sharding=kernel.sharding)},
                layers_2={'w': jax.ShapeDtypeStruct((3,), kernel.dtype, sharding=kernel.sharding)})
  return dict(abstract, params=params)


@pytest.mark.parametrize('shapes_in_meta', [True, False], ids=['shapes_in_meta', 'orbax_metadata'])
def test_config_change_is_one_line_and_touches_nothing(tmp_path, shapes_in_meta):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(1, _state(1), 1)
  ckpt.close()
  step_dir = os.path.join(tmp_path, 'checkpoints', '1')
  if not shapes_in_meta:  # as written before the shapes were kept with the fingerprint
    path = os.path.join(step_dir, 'meta', 'metadata')
    meta = json.load(open(path))
    del meta['shapes']
    json.dump(meta, open(path, 'w'))
  before = digest_files(os.path.join(tmp_path, 'checkpoints'))
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  with pytest.raises(UserError) as e:
    ckpt.restore_latest(_changed_model(_abstract(_state(0))))
  ckpt.close()
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(
      f'checkpoint {step_dir} does not fit the configured model (params/dense/kernel: model '
      '(16, 12), checkpoint (16, 8); params/layers_2/w: model (3,), checkpoint absent); ')
  assert 'the model config likely changed since it was written' in message
  assert f'({tmp_path}/config.gin)' in message
  assert digest_files(os.path.join(tmp_path, 'checkpoints')) == before


def test_storage_error_on_read_is_one_line_and_touches_nothing(tmp_path, monkeypatch):
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  ckpt.save(1, _state(1), 1)
  ckpt.close()
  step_dir = os.path.join(tmp_path, 'checkpoints', '1')
  before = digest_files(os.path.join(tmp_path, 'checkpoints'))
  cls = type(epath.Path('/'))
  def denied(self, *args, _original=cls.read_text, **kwargs):
    if str(self).startswith(step_dir):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
    return _original(self, *args, **kwargs)
  monkeypatch.setattr(cls, 'read_text', denied)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1)
  with pytest.raises(UserError, match=(
      f'^cannot read checkpoint {step_dir} \\(Permission denied: {step_dir}/meta/metadata\\); '
      'fix the permissions or the storage, then re-run.$')):
    ckpt.restore_latest(_abstract(_state(0)))
  ckpt.close()
  assert digest_files(os.path.join(tmp_path, 'checkpoints')) == before


@pytest.mark.parametrize('async_save', [True, False], ids=['async', 'sync'])
@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EACCES], ids=['disk_full', 'permission'])
def test_failed_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, code, async_save):
  """keep=1: orbax's own retention would delete step 1 once step 2 started."""
  directory = os.path.join(tmp_path, 'checkpoints')
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=1, async_save=async_save)
  ckpt.save(1, _state(1), 1)
  ckpt.wait()
  before = digest_files(os.path.join(directory, '1'))
  with monkeypatch.context() as m:
    fail_writes(m, os.path.join(directory, '2.'), code)
    with pytest.raises(UserError) as e:
      ckpt.save(2, _state(2), 2)
      ckpt.wait()  # an asynchronous save reports here
    ckpt.close()  # the failure is reported once
  message = str(e.value)
  assert message.startswith(
      f'writing checkpoint {directory}/2 failed ({os.strerror(code)}: {directory}/2.')
  assert message.endswith(
      f'the earlier checkpoints are intact (latest: {directory}/1); free space or fix the '
      f'permissions of {directory}, then re-run to resume.')
  assert [d for d in os.listdir(directory) if '.orbax-checkpoint-tmp' not in d] == ['1']
  assert digest_files(os.path.join(directory, '1')) == before
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_period=1, keep=1, async_save=async_save)
  state, meta, _ = ckpt.restore_latest(_abstract(_state(0)))
  assert meta['step'] == 1
  _assert_equal(state, _state(1))
  ckpt.save(2, _state(2), 2)
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['2']  # keep=1, and the partial step 2 is gone


@pytest.mark.parametrize('has_checkpoints', [False, True], ids=['new', 'resumed'])
def test_unwritable_model_dir_is_one_line(tmp_path, monkeypatch, has_checkpoints):
  model_dir = tmp_path / 'run'
  (model_dir / 'checkpoints' if has_checkpoints else model_dir).mkdir(parents=True)
  deny_writes(monkeypatch, model_dir)
  with pytest.raises(UserError, match=(
      f'^cannot write checkpoints to {model_dir}/checkpoints \\(Permission denied: '
      f'{model_dir}/checkpoints\\); fix the permissions or free space there, or choose '
      'another MODEL_DIR.$')):
    checkpoints.Checkpointer(str(model_dir), save_period=1)
  for root, _, _ in os.walk(model_dir):
    os.chmod(root, 0o755)


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
