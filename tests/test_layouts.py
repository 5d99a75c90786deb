"""The four layouts (data, FSDP, tensor, all three) on 8 fake CPU devices, for
every model family: same losses as one device, parameters sharded as intended,
checkpoints that move between meshes, layout errors, and configs/meshes/*.gin.

Everything runs in one subprocess (8 devices must be set before jax starts).
"""

import subprocess
import sys
import textwrap

from conftest import REPO, run_env

SCRIPT = textwrap.dedent(r'''
    import glob, math, os, tempfile
    import gin, jax, numpy as np
    from flax import linen as nn
    from t5x_lite import checkpoints, gin_utils, optimizers, trainer
    from t5x_lite.errors import UserError
    from t5x_lite.models import bart, decoder, encoder, encoder_decoder
    from t5x_lite.partitioning import Partitioner

    assert jax.device_count() == 8
    BATCH = 8
    VOCAB = 128

    def expect_error(fn, *texts):
      try:
        fn()
      except UserError as e:
        message = str(e)
        assert '\n' not in message and all(t in message for t in texts), message
      else:
        raise AssertionError(f'no error: {texts}')

    def t5(**kw):
      cfg = dict(vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                 num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)
      return encoder_decoder.EncoderDecoderModel(encoder_decoder.T5Config(**{**cfg, **kw}))

    FAMILIES = {
        't5': (t5(), (8, 8)),
        'bert': (encoder.EncoderModel(encoder.BertConfig(
            vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1,
            max_positions=16, dropout_rate=0.0, attention_dropout_rate=0.0)), (8,)),
        'gpt': (decoder.DecoderModel(decoder.GPTConfig(
            vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1,
            max_positions=16, dropout_rate=0.0, attention_dropout_rate=0.0)), (8,)),
        'bart': (bart.BartModel(bart.BartConfig(
            vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
            num_encoder_layers=1, num_decoder_layers=1, max_positions=16,
            dropout_rate=0.0)), (8, 8)),
    }

    # name: (mesh shape, rules, how many ways each logical axis is split).
    LAYOUTS = {
        'data8': ((8, 1, 1), 'data_parallel', {}),
        'fsdp8': ((1, 8, 1), 'fsdp', {'embed': 8}),
        'data4_model2': ((4, 1, 2), 'model_parallel',
                         {'vocab': 2, 'mlp': 2, 'heads': 2, 'joined_kv': 2}),
        'data2_fsdp2_model2': ((2, 2, 2), 'fsdp_model_parallel',
                               {'embed': 2, 'vocab': 2, 'mlp': 2, 'heads': 2, 'joined_kv': 2}),
    }

    def random_batch(model, lengths, seed):
      rng = np.random.RandomState(seed)
      batch = {}
      for k, v in model.dummy_batch(BATCH, *lengths).items():
        if 'weights' in k:
          batch[k] = (rng.rand(*v.shape) < 0.8).astype(v.dtype)
        elif 'segment' in k:
          batch[k] = np.zeros_like(v)
        elif 'label' in k:
          batch[k] = rng.randint(0, 2, v.shape).astype(v.dtype)
        else:
          batch[k] = rng.randint(1, VOCAB, v.shape).astype(v.dtype)
      return batch

    def make_trainer(model, lengths, mesh_shape, rules, devices=None):
      shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                for k, v in model.dummy_batch(BATCH, *lengths).items()}
      p = Partitioner(mesh_shape, rules=rules, devices=devices)
      return trainer.Trainer(model, optimizers.adamw(1e-2, max_grad_norm=None), p, shapes)

    def three_losses(t, state, batches):
      """Places `state` (host arrays) on the trainer's mesh and trains on `batches`."""
      state = jax.device_put(state, t.state_shardings)
      losses = []
      for batch in batches:
        state, metrics = t.train_step(state, t.partitioner.shard_batch(batch))
        losses.append(float(metrics['loss']))
      return state, losses

    def logical_names(model, lengths):
      boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_batch(BATCH, *lengths))
      return jax.tree_util.tree_leaves(nn.get_partition_spec(boxed['params']),
                                       is_leaf=lambda x: isinstance(x, jax.P))

    def check_sharded(t, state, names, splits, family, layout):
      """Every param's (and its Adam moment's) shard is its shape divided by the
      splits of its logical axes; the batch is split over data x fsdp."""
      params = jax.tree_util.tree_leaves_with_path(state.params)
      mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if '.mu' in jax.tree_util.keystr(path)]
      assert len(names) == len(params) == len(mu)
      for logical, (path, param), moment in zip(names, params, mu):
        want = tuple(size // splits.get(n, 1) for n, size in zip(logical, param.shape))
        got = param.addressable_shards[0].data.shape
        assert got == want, (family, layout, jax.tree_util.keystr(path), logical, got, want)
        assert moment.addressable_shards[0].data.shape == want, (family, layout, path)
      batch_split = math.prod(t.partitioner.mesh.shape[a] for a in ('data', 'fsdp'))
      assert t.batch_sharding.shard_shape((BATCH, 8)) == (BATCH // batch_split, 8), layout

    t5_states = {}
    # 1. The first 3 losses (on one batch, so they fall) equal one device's: T5
    # on every layout and every family on the combined one (every family on
    # every layout with ALL_LAYOUTS=1, a longer check).
    every = os.environ.get('ALL_LAYOUTS') == '1'
    for family, (model, lengths) in FAMILIES.items():
      batches = [random_batch(model, lengths, seed=0)] * 3  # loss must fall
      single_t = make_trainer(model, lengths, (1, 1, 1), 'data_parallel', jax.devices()[:1])
      initial = jax.device_get(single_t.init_state(0))
      _, single = three_losses(single_t, initial, batches)
      names = logical_names(model, lengths)
      assert single[0] > single[2], (family, single)
      for layout, (mesh_shape, rules, splits) in LAYOUTS.items():
        if not (every or family == 't5' or layout == 'data2_fsdp2_model2'):
          continue
        t = make_trainer(model, lengths, mesh_shape, rules)
        state, losses = three_losses(t, initial, batches)
        np.testing.assert_allclose(losses, single, rtol=1e-5, err_msg=f'{family} {layout}')
        check_sharded(t, state, names, splits, family, layout)
        if family == 't5':
          t5_states[layout] = state
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses, single))
        print(f'{family:5s} {layout:20s} max relative loss difference {diff:.1e}')

    # FSDP=8: the embedding table's shard on each device holds 1/8 of it.
    embedding = t5_states['fsdp8'].params['token_embedder']['embedding']
    assert embedding.sharding.spec == jax.P(None, 'fsdp'), embedding.sharding.spec
    assert embedding.addressable_shards[0].data.size * 8 == embedding.size

    # 2. A checkpoint saved under data=8 restores on fsdp=2 x model=4 and on one
    # device: same values, the new mesh's shardings.
    model, lengths = FAMILIES['t5']
    saved = t5_states['data8']
    want = jax.tree_util.tree_map(np.asarray, saved.to_dict())
    with tempfile.TemporaryDirectory() as model_dir:
      ckpt = checkpoints.Checkpointer(model_dir, save_period=1, async_save=False)
      ckpt.save(1, saved.to_dict(), data_position=1)
      ckpt.wait()
      for mesh_shape, rules, devices in [((1, 2, 4), 'fsdp_model_parallel', None),
                                         ((1, 1, 1), 'data_parallel', jax.devices()[:1])]:
        new_t = make_trainer(model, lengths, mesh_shape, rules, devices)
        abstract = new_t.abstract_state().to_dict()
        state, meta, _ = ckpt.restore_latest(abstract)
        assert meta['step'] == 1 and int(state['step']) == 3
        jax.tree_util.tree_map(np.testing.assert_array_equal, want,
                               jax.tree_util.tree_map(np.asarray, state))
        for a, b in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state)):
          assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (a.sharding, b.sharding)
        assert state['params']['token_embedder']['embedding'].sharding.mesh.devices.size \
            == math.prod(mesh_shape)
      ckpt.close()
    print('restored on other meshes')

    # 3. Layout errors, one line each, before anything compiles.
    expect_error(lambda: Partitioner((16, 1, 1)), 'needs 16 devices but 8')
    expect_error(lambda: Partitioner((-1, 3, 1)), 'do not divide the 8')
    expect_error(lambda: Partitioner((2, 2, 2), rules='fsdp_model_parallel').check_batch_size(6),
                 'batch size 6', 'data-parallel size 4', 'multiple of 4')
    expect_error(lambda: make_trainer(t5(mlp_dim=60), lengths, (1, 1, 8), 'model_parallel'),
                 "parameter decoder/layers_0/mlp/wi_0/kernel has logical axis 'mlp' of size 60",
                 "mesh axis 'model' of size 8", "multiple of 8")
    expect_error(lambda: make_trainer(t5(emb_dim=34), lengths, (2, 4, 1), 'fsdp'),
                 "logical axis 'embed' of size 34", "mesh axis 'fsdp' of size 4")
    p = Partitioner((2, 2, 2), rules='fsdp_model_parallel')
    with p.activate():
      boxed = jax.eval_shape(t5().init, jax.random.PRNGKey(0), t5().dummy_batch(BATCH, 8, 8))
    p.check(boxed['params'], BATCH)
    expect_error(lambda: p.check(boxed['params'], 2), 'batch size 2')

    # 4. Every configs/meshes/*.gin parses and builds its mesh on 8 devices.
    built = {}
    for path in sorted(glob.glob('configs/meshes/*.gin')):
      gin.clear_config()
      gin_utils.parse_gin([path], [])
      built[os.path.basename(path)] = dict(gin.get_configurable(Partitioner)().mesh.shape)
    print(built)
    assert built['tpu_v3_4x4.gin'] == {'data': 8, 'fsdp': 1, 'model': 1}
    assert built['tpu_v3_8x8.gin'] == {'data': 1, 'fsdp': 8, 'model': 1}
    assert built['tpu_v4_2x2x2.gin'] == {'data': 2, 'fsdp': 2, 'model': 2}
    assert built['tpu_v5e_4x4.gin'] == {'data': 2, 'fsdp': 4, 'model': 1}
    print('OK')
''')


def test_layouts_on_eight_fake_devices():
  env = run_env(8)
  # Twenty small compilations: skip LLVM's slow passes (numerics are unchanged).
  env['XLA_FLAGS'] += ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stdout + proc.stderr[-5000:]
