"""Meshes from config, layout errors before compiling, sharded params and batches."""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_env
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner


def test_one_device_mesh():
  p = Partitioner()
  assert dict(p.mesh.shape) == {'data': 1, 'model': 1}
  p.check_batch_size(3)


@pytest.mark.parametrize('shape, match', [
    ((2, 1), 'needs 2 devices but 1 are available'),
    ((-1, -1), 'more than one -1'),
    ((1,), 'differ in length'),
])
def test_bad_meshes(shape, match):
  with pytest.raises(UserError, match=match):
    Partitioner(mesh_shape=shape)


def test_bad_rules():
  with pytest.raises(UserError, match='unknown rule set'):
    Partitioner(rules='tensor_parallel_3d')
  with pytest.raises(UserError, match="names a mesh axis"):
    Partitioner(rules=[('batch', 'fsdp')])


EIGHT_DEVICES = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from t5x_lite.errors import UserError
    from t5x_lite.partitioning import Partitioner
    from t5x_lite.models import encoder_decoder
    from t5x_lite import optimizers, trainer

    def expect_error(fn, text):
      try:
        fn()
      except UserError as e:
        assert text in str(e), str(e)
      else:
        raise AssertionError('no error: ' + text)

    assert dict(Partitioner().mesh.shape) == {'data': 8, 'model': 1}
    assert dict(Partitioner((4, -1)).mesh.shape) == {'data': 4, 'model': 2}
    expect_error(lambda: Partitioner((3, -1)), 'do not divide the 8')
    expect_error(lambda: Partitioner((16, 1)), 'needs 16 devices but 8')
    expect_error(lambda: Partitioner().check_batch_size(12), 'not divisible by the data-parallel size 8')

    cfg = encoder_decoder.T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8,
                                   mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1)
    model = encoder_decoder.EncoderDecoderModel(cfg)
    batch = model.dummy_batch(8, 16, 8)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    rng = np.random.RandomState(0)
    real = {k: rng.randint(1, 128, size=v.shape).astype(v.dtype) for k, v in batch.items()}
    real['decoder_loss_weights'] = np.ones_like(real['decoder_loss_weights'])
    losses = {}
    for name, shape, rules in [('single', (1, 1), 'data_parallel'),
                               ('data8', (8, 1), 'data_parallel'),
                               ('data4_model2', (4, 2), 'model_parallel')]:
      devices = jax.devices()[:1] if name == 'single' else None
      p = Partitioner(shape, rules=rules, devices=devices)
      t = trainer.Trainer(model, optimizers.adafactor(), p, shapes)
      state = t.init_state(0)
      if name == 'data4_model2':
        spec = state.params['decoder']['logits_dense']['kernel'].sharding.spec \\
            if 'logits_dense' in state.params.get('decoder', {}) else None
        print('logits spec', spec)
        print(p.describe(t.abstract_params, t.param_shardings).splitlines()[0])
      out = []
      for _ in range(3):
        state, m = t.train_step(state, p.shard_batch(real))
        out.append(float(m['loss']))
      losses[name] = out
    print(losses)
    for name in ('data8', 'data4_model2'):
      np.testing.assert_allclose(losses[name], losses['single'], rtol=1e-5)
    print('OK')
''')


def test_eight_fake_devices():
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICES], cwd=REPO, env=run_env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stdout + proc.stderr[-5000:]
