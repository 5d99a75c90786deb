"""Grouped-query attention's key / value heads on a model-parallel mesh of 8
fake devices: sharded where the 'model' axis divides them, replicated where it
does not, with the loss and gradients of one device either way."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from t5x_lite.models import llama
from t5x_lite.partitioning import Partitioner

# 2 key / value heads for 4 query heads.
CONFIG = llama.LlamaConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64, num_layers=1)


@pytest.fixture(scope='module')
def one_device():
  """(model, boxed params, batch, loss, grads) on one device."""
  model = llama.LlamaModel(CONFIG)
  ids = np.random.RandomState(0).randint(1, 64, (8, 9)).astype(np.int32)
  ids[1, 6:] = 0
  batch = dict(decoder_input_tokens=ids[:, :-1], decoder_target_tokens=ids[:, 1:],
               decoder_loss_weights=(ids[:, 1:] > 0).astype(np.int32))
  boxed = jax.jit(model.init)(jax.random.key(0), batch)['params']
  loss, grads = _loss_and_grads(model)(nn.unbox(boxed), batch)
  return model, boxed, batch, float(loss), grads


def _loss_and_grads(model):
  return jax.jit(jax.value_and_grad(lambda p, b: model.loss_fn(p, b, None)[0]))


@pytest.mark.parametrize('model_axis, key_shard', [(2, (32, 1, 8)), (4, (32, 2, 8))],
                         ids=['model2_sharded', 'model4_replicated'])
def test_kv_heads_sharded_where_the_model_axis_divides_them(one_device, model_axis, key_shard):
  """The key kernel [D, K=2, H] is split 2 ways on model=2 and replicated on
  model=4, while the query heads [D, N*H=32] are split either way."""
  model, boxed, batch, loss, grads = one_device
  partitioner = Partitioner((8 // model_axis, 1, model_axis), rules='model_parallel')
  params = jax.device_put(nn.unbox(boxed), partitioner.logical_shardings(boxed))
  with partitioner.activate():
    theirs_loss, theirs = _loss_and_grads(model)(params, partitioner.shard_batch(batch))
  attention = params['decoder']['layers_0']['self_attention']
  assert attention['key']['kernel'].addressable_shards[0].data.shape == key_shard
  assert attention['value']['kernel'].addressable_shards[0].data.shape == key_shard
  assert attention['query']['kernel'].addressable_shards[0].data.shape == (32, 32 // model_axis)
  np.testing.assert_allclose(float(theirs_loss), loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), theirs, grads)
