"""The four layouts (data, FSDP, tensor, all three) on 8 fake CPU devices, for
every model family: same losses as one device, parameters sharded as intended,
checkpoints that move between meshes, layout errors, and configs/meshes/*.gin.

By default T5 runs on every layout and every family on the combined one;
ALL_LAYOUTS=1 runs every family on every layout.
"""

import functools
import glob
import math
import os

import gin
import jax
import numpy as np
import pytest
from flax import linen as nn

import families
from t5x_lite import checkpoints, gin_utils, optimizers, trainer
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH = 8
# Sizes every layout divides: 'embed' 8 ways (FSDP=8), the rest 2 ways.
SIZES = dict(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1)
LENGTHS = {'t5': (8, 8), 'bert': (8,), 'gpt': (8,), 'bart': (8, 8)}
FAMILIES = tuple(LENGTHS)

# name: (mesh shape, rules, how many ways each logical axis is split).
LAYOUTS = {
    'data8': ((8, 1, 1), 'data_parallel', {}),
    'fsdp8': ((1, 8, 1), 'fsdp', {'embed': 8}),
    'data4_model2': ((4, 1, 2), 'model_parallel',
                     {'vocab': 2, 'mlp': 2, 'heads': 2, 'joined_kv': 2}),
    'data2_fsdp2_model2': ((2, 2, 2), 'fsdp_model_parallel',
                           {'embed': 2, 'vocab': 2, 'mlp': 2, 'heads': 2, 'joined_kv': 2}),
}
EVERY = os.environ.get('ALL_LAYOUTS') == '1'
CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS
         if EVERY or family == 't5' or layout == 'data2_fsdp2_model2']


def model(family, **changes):
  return families.tiny(family, **{**SIZES, **changes})


def make_trainer(family, mesh_shape, rules, devices=None, **changes):
  m = model(family, **changes)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in m.dummy_batch(BATCH, *LENGTHS[family]).items()}
  p = Partitioner(mesh_shape, rules=rules, devices=devices)
  return trainer.Trainer(m, optimizers.adamw(1e-2, max_grad_norm=None), p, shapes)


def three_losses(t, state, batch):
  """Places `state` (host arrays) on the trainer's mesh; 3 steps on `batch`."""
  state = jax.device_put(state, t.state_shardings)
  losses = []
  for _ in range(3):
    state, metrics = t.train_step(state, t.partitioner.shard_batch(batch))
    losses.append(float(metrics['loss']))
  return state, losses


@functools.cache
def one_device(family):
  """(initial state on the host, the batch, 3 losses on one device)."""
  batch = families.random_batch(model(family), BATCH, LENGTHS[family])
  t = make_trainer(family, (1, 1, 1), 'data_parallel', jax.devices()[:1])
  initial = jax.device_get(t.init_state(0))
  _, losses = three_losses(t, initial, batch)
  return initial, batch, losses


@functools.cache
def on_layout(family, layout):
  """(trainer, state, losses) after the same 3 steps on `layout`'s mesh."""
  mesh_shape, rules, _ = LAYOUTS[layout]
  initial, batch, _ = one_device(family)
  t = make_trainer(family, mesh_shape, rules)
  return (t, *three_losses(t, initial, batch))


@pytest.mark.parametrize('family', FAMILIES)
def test_loss_falls_on_one_device(family):
  losses = one_device(family)[2]
  assert losses[0] > losses[2], losses  # three steps on one batch


@pytest.mark.parametrize('family, layout', CASES)
def test_same_losses_and_sharded_params(family, layout):
  """The first 3 losses equal one device's; every param's (and its Adam
  moment's) shard is its shape divided by the splits of its logical axes; the
  batch is split over data x fsdp."""
  t, state, losses = on_layout(family, layout)
  np.testing.assert_allclose(losses, one_device(family)[2], rtol=1e-5)

  splits = LAYOUTS[layout][2]
  boxed = jax.eval_shape(model(family).init, jax.random.PRNGKey(0),
                         model(family).dummy_batch(BATCH, *LENGTHS[family]))
  names = jax.tree_util.tree_leaves(nn.get_partition_spec(boxed['params']),
                                    is_leaf=lambda x: isinstance(x, jax.P))
  params = jax.tree_util.tree_leaves_with_path(state.params)
  mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if '.mu' in jax.tree_util.keystr(path)]
  assert len(names) == len(params) == len(mu) > 0
  for logical, (path, param), moment in zip(names, params, mu):
    want = tuple(size // splits.get(n, 1) for n, size in zip(logical, param.shape))
    got = param.addressable_shards[0].data.shape
    assert got == want, (jax.tree_util.keystr(path), logical, got, want)
    assert moment.addressable_shards[0].data.shape == want, jax.tree_util.keystr(path)
  batch_split = math.prod(t.partitioner.mesh.shape[a] for a in ('data', 'fsdp'))
  assert t.batch_sharding.shard_shape((BATCH, 8)) == (BATCH // batch_split, 8)


def test_fsdp8_puts_an_eighth_of_the_embedding_on_each_device():
  embedding = on_layout('t5', 'fsdp8')[1].params['token_embedder']['embedding']
  assert embedding.sharding.spec == jax.P(None, 'fsdp'), embedding.sharding.spec
  assert embedding.addressable_shards[0].data.size * 8 == embedding.size


@pytest.fixture(scope='module')
def data8_checkpoint(tmp_path_factory):
  """A T5 checkpoint saved under data=8 after 3 steps."""
  saved = on_layout('t5', 'data8')[1]
  ckpt = checkpoints.Checkpointer(str(tmp_path_factory.mktemp('data8')), save_period=1,
                                  async_save=False)
  ckpt.save(1, saved.to_dict(), data_position=1)
  ckpt.wait()
  yield ckpt, jax.tree_util.tree_map(np.asarray, saved.to_dict())
  ckpt.close()


@pytest.mark.parametrize('mesh_shape, rules', [
    ((1, 2, 4), 'fsdp_model_parallel'),
    ((1, 1, 1), 'data_parallel'),
], ids=['fsdp2_model4', 'one_device'])
def test_checkpoint_restores_on_another_mesh(data8_checkpoint, mesh_shape, rules):
  """Same values, the new mesh's shardings."""
  ckpt, want = data8_checkpoint
  devices = jax.devices()[:math.prod(mesh_shape)]
  new_t = make_trainer('t5', mesh_shape, rules, devices)
  abstract = new_t.abstract_state().to_dict()
  state, meta, _ = ckpt.restore_latest(abstract)
  assert meta['step'] == 1 and int(state['step']) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, want,
                         jax.tree_util.tree_map(np.asarray, state))
  for a, b in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state)):
    assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (a.sharding, b.sharding)
  assert state['params']['token_embedder']['embedding'].sharding.mesh.devices.size \
      == math.prod(mesh_shape)


def _checked_params():
  p = Partitioner((2, 2, 2), rules='fsdp_model_parallel')
  with p.activate():
    boxed = jax.eval_shape(model('t5').init, jax.random.PRNGKey(0),
                           model('t5').dummy_batch(BATCH, 8, 8))
  p.check(boxed['params'], BATCH)  # fits: no error
  p.check(boxed['params'], 2)


# Layout errors: one line each, before anything compiles.
@pytest.mark.parametrize('make, texts', [
    (lambda: Partitioner((16, 1, 1)), ['needs 16 devices but 8']),
    (lambda: Partitioner((-1, 3, 1)), ['do not divide the 8']),
    (lambda: Partitioner((3, -1, 1)), ['do not divide the 8']),
    (lambda: Partitioner().check_batch_size(12),
     ['not divisible by the data-parallel size 8']),
    (lambda: Partitioner((2, 2, 2), rules='fsdp_model_parallel').check_batch_size(6),
     ['batch size 6', 'data-parallel size 4', 'multiple of 4']),
    (lambda: make_trainer('t5', (1, 1, 8), 'model_parallel', mlp_dim=60),
     ["parameter decoder/layers_0/mlp/wi_0/kernel has logical axis 'mlp' of size 60",
      "mesh axis 'model' of size 8", 'multiple of 8']),
    (lambda: make_trainer('t5', (2, 4, 1), 'fsdp', emb_dim=34),
     ["logical axis 'embed' of size 34", "mesh axis 'fsdp' of size 4"]),
    (_checked_params, ['batch size 2']),
], ids=['too_many_devices', 'fsdp_does_not_divide', 'data_does_not_divide',
        'batch_vs_data', 'batch_vs_data_fsdp', 'mlp_vs_model', 'embed_vs_fsdp', 'check_batch'])
def test_layout_errors(make, texts):
  with pytest.raises(UserError) as error:
    make()
  message = str(error.value)
  assert '\n' not in message and all(t in message for t in texts), message


def test_mesh_shapes_fill_eight_devices():
  assert dict(Partitioner().mesh.shape) == {'data': 8, 'fsdp': 1, 'model': 1}
  assert dict(Partitioner((-1, 2, 2)).mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
  assert dict(Partitioner((4, -1)).mesh.shape) == {'data': 4, 'model': 2}
  assert Partitioner((2, 2, 2), rules='fsdp').data_parallel_size == 4
  assert Partitioner((4, 2), rules='model_parallel').data_parallel_size == 4


def test_every_mesh_config_builds_on_eight_devices():
  built = {}
  try:
    for path in sorted(glob.glob(os.path.join(REPO, 'configs', 'meshes', '*.gin'))):
      gin.clear_config()
      gin_utils.parse_gin([path], [])
      built[os.path.basename(path)] = dict(gin.get_configurable(Partitioner)().mesh.shape)
  finally:
    gin.clear_config()
  assert built['tpu_v3_4x4.gin'] == {'data': 8, 'fsdp': 1, 'model': 1}
  assert built['tpu_v3_8x8.gin'] == {'data': 1, 'fsdp': 8, 'model': 1}
  assert built['tpu_v4_2x2x2.gin'] == {'data': 2, 'fsdp': 2, 'model': 2}
  assert built['tpu_v5e_4x4.gin'] == {'data': 2, 'fsdp': 4, 'model': 1}


def test_gpt_trains_on_a_two_by_two_mesh_under_model_parallel_rules():
  """A few adamw steps on a fixed batch on 4 of the devices as data=2 x
  model=2: the query kernel is split over 'model', the first loss equals the
  unsharded one and the loss falls."""
  m = model('gpt')
  rng = np.random.RandomState(0)
  batch = m.dummy_batch(4, 16)
  batch['decoder_target_tokens'] = rng.randint(1, 128, (4, 16)).astype(np.int32)
  batch['decoder_input_tokens'] = np.pad(batch['decoder_target_tokens'][:, :-1], ((0, 0), (1, 0)))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  # model_parallel maps 'batch' to 'data' as data_parallel does, and shards
  # heads / mlp / vocab over 'model'.
  p = Partitioner((2, 2), rules='model_parallel', devices=jax.devices()[:4])
  t = trainer.Trainer(m, optimizers.adamw(3e-3), p, shapes)
  state = t.init_state(0)
  qspec = tuple(state.params['decoder']['layers_0']['self_attention']['query']['kernel']
                .sharding.spec)
  assert qspec == (None, 'model'), qspec
  host_params = jax.tree_util.tree_map(np.asarray, state.params)
  want = float(jax.jit(m.loss_fn)(host_params, batch, None)[0])
  losses = []
  for _ in range(4):
    state, metrics = t.train_step(state, p.shard_batch(batch))
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert losses[-1] < losses[0] - 0.05, losses
  assert {'loss', 'accuracy', 'cross_ent_loss', 'learning_rate'} <= set(metrics)
