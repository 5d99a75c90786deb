"""The kernel switch: the CPU kernels (t5x_lite.ops.cpu) give the plain
einsum path's values and gradients, op by op and for every model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from t5x_lite import ops
from t5x_lite.ops import cpu

import families

RTOL = 1e-5


def close(got, want, rtol=RTOL, atol=1e-6):
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


@pytest.mark.parametrize('a_shape,b_shape', [((3, 7, 4), (3, 4, 9)),   # a narrower than g
                                              ((3, 7, 9), (3, 9, 4)),   # g narrower than a
                                              ((12, 6), (6, 6))])
def test_product_and_scores_gradients_are_the_plain_ones(a_shape, b_shape):
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=s).astype(np.float32) for s in (a_shape, b_shape))
  g = rng.normal(size=a_shape[:-1] + b_shape[-1:]).astype(np.float32)
  da, db = jax.grad(lambda a, b: jnp.sum(cpu.product(a, b) * g), (0, 1))(a, b)
  np.testing.assert_allclose(da, g @ np.swapaxes(b, -1, -2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.swapaxes(a, -1, -2) @ g, rtol=1e-5, atol=1e-5)
  k = np.swapaxes(b, -1, -2)
  dq, dk = jax.grad(lambda q, k: jnp.sum(cpu.scores(q, k) * g), (0, 1))(a, k)
  np.testing.assert_allclose(dq, da, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, np.swapaxes(db, -1, -2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spec,a_shape,b_shape', [
    ('BTD,DNH->BTNH', (2, 5, 8), (8, 3, 4)),     # query projection
    ('BSD,DNH->BNSH', (2, 5, 8), (8, 3, 4)),     # heads-major keys
    ('BTNH,NHD->BTD', (2, 5, 3, 4), (3, 4, 8)),  # output projection
    ('BTD,VD->BTV', (2, 5, 8), (11, 8)),         # tied logits
    ('abD,DF->abF', (2, 5, 8), (8, 6)),          # a dense layer
    ('BNTH,BNSH->BNTS', (2, 3, 5, 4), (2, 3, 6, 4)),  # scores
    ('BNTS,BNSH->BNTH', (2, 3, 5, 6), (2, 3, 6, 4)),  # weights x values
    ('BTNH,BSNH->BNTS', (2, 5, 3, 4), (2, 6, 3, 4)),  # neither form: jnp.einsum
])
def test_cpu_einsum_equals_jnp_einsum_with_gradients(spec, a_shape, b_shape):
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in (a_shape, b_shape))
  want = jnp.einsum(spec, a, b)
  g = jnp.asarray(rng.normal(size=want.shape).astype(np.float32))
  close(cpu.einsum(spec, a, b), want)
  close(jax.grad(lambda a, b: jnp.sum(cpu.einsum(spec, a, b) * g), (0, 1))(a, b),
        jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * g), (0, 1))(a, b))


@pytest.mark.parametrize('with_dropout', [False, True])
def test_cpu_attention_equals_the_plain_one_with_gradients(with_dropout):
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)).astype(np.float32)) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(1, 3, 5, 5)).astype(np.float32))  # a position bias
  mask = jnp.asarray(rng.random((2, 1, 5, 5)) < 0.7).at[:, :, :, 0].set(True)
  g = jnp.asarray(rng.normal(size=(2, 5, 3, 4)).astype(np.float32))
  keep = jnp.asarray(rng.random((2, 3, 5, 5)) < 0.8)
  dropout = (lambda w: jnp.where(keep, w / 0.8, 0.0)) if with_dropout else None

  def run(kernels, q, k, v, bias):
    with ops.use_kernels(kernels):
      if ops.kv_layout() == 'BNSH':
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
      return ops.attention(q, k, v, bias=bias, mask=mask, scale=0.5, dropout=dropout)

  def loss(kernels):
    return lambda *x: jnp.sum(run(kernels, *x) * g)

  want = run('plain', q, k, v, bias)
  w = jax.nn.softmax(jnp.where(mask, 0.5 * jnp.einsum('btnh,bsnh->bnts', q, k) + bias, -1e10))
  w = dropout(w) if with_dropout else w
  close(want, jnp.einsum('bnts,bsnh->btnh', w, v))
  close(run('cpu', q, k, v, bias), want)
  close(jax.grad(loss('cpu'), (0, 1, 2, 3))(q, k, v, bias),
        jax.grad(loss('plain'), (0, 1, 2, 3))(q, k, v, bias), atol=1e-5)


def test_the_setting_resolves_and_restores():
  assert ops.active() == 'cpu'  # 'auto' on a CPU backend
  with ops.use_kernels('auto', platform='tpu'):
    assert ops.active() == 'plain' and ops.kv_layout() == 'BSNH'
  with ops.use_kernels('plain'):
    with ops.use_kernels('cpu'):
      assert ops.kv_layout() == 'BNSH'
    assert ops.active() == 'plain'
  assert ops.active() == 'cpu'
  with pytest.raises(ValueError, match='plain'):
    ops.set_kernels('fast')


@pytest.mark.parametrize('family', ['t5', 'bert', 'gpt', 'gpt_scanned', 'bart'])
def test_every_family_has_the_same_loss_and_gradients_on_both_kernels(family):
  model = families.tiny(family)
  batch = families.random_batch(model)
  # Compiled whole (as a train step is), not op by op: much faster to run. The
  # setting is read when a function is traced, so each kernel setting gets its own.
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  results = {}
  for kernels in ('plain', 'cpu'):
    with ops.use_kernels(kernels):
      grad_fn = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0]))
      results[kernels] = grad_fn(params)
      if family in ('t5', 'gpt', 'bart'):
        decode = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=5)[0])
        results[kernels + '_decoded'] = decode(params, batch)
  close(results['cpu'][0], results['plain'][0])
  close(results['cpu'][1], results['plain'][1], atol=1e-6)
  if family in ('t5', 'gpt', 'bart'):
    np.testing.assert_array_equal(results['cpu_decoded'], results['plain_decoded'])


def test_gin_chooses_the_kernels(tmp_path):
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'kernels.gin'
  path.write_text("ops.kernels.name = 'plain'\n")
  try:
    gin_utils.parse_gin([str(path)], [])
    assert ops.active() == 'plain'
    with pytest.raises(UserError, match="kernels='fast'"):
      gin_utils.parse_gin([str(path)], ["ops.kernels.name = 'fast'"])
  finally:
    gin.clear_config()
    ops.set_kernels('auto')
