"""LoRA adapters on a mesh of 8 fake devices: each adapter is split as the
kernel it adapts (B of the key / value kernels over the kv heads, of the
query kernel over the heads), and three train steps there give the losses
and adapters of one device, with the frozen base bit-identical."""

import jax
import numpy as np
import pytest

from t5x_lite import lora, optimizers
from t5x_lite import trainer as trainer_lib
from t5x_lite.models import llama
from t5x_lite.partitioning import Partitioner

# 2 key / value heads for 4 query heads: both split 2 ways on model=2.
BASE = llama.LlamaModel(llama.LlamaConfig(vocab_size=64, emb_dim=32, num_heads=4,
                                          num_kv_heads=2, head_dim=8, mlp_dim=64,
                                          num_layers=1))
CONFIG = lora.LoraConfig(targets=('query', 'key', 'value', 'out', 'wi_0', 'wi_1', 'wo'),
                         rank=4, alpha=8.0, init='gaussian')
STEPS = 3


def _batch():
  ids = np.random.RandomState(0).randint(1, 64, (8, 9)).astype(np.int32)
  ids[1, 6:] = 0
  return dict(decoder_input_tokens=ids[:, :-1], decoder_target_tokens=ids[:, 1:],
              decoder_loss_weights=(ids[:, 1:] > 0).astype(np.int32))


def _train(partitioner):
  """(losses, final state) of STEPS steps of the LoRA model on `partitioner`."""
  batch = _batch()
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  trainer = trainer_lib.Trainer(lora.LoraModel(BASE, CONFIG), optimizers.adamw(1e-2),
                                partitioner, shapes)
  state = trainer.init_state(seed=0)
  base = jax.device_get(state.frozen['base'])
  losses = []
  for _ in range(STEPS):
    state, metrics = trainer.train_step(state, partitioner.shard_batch(batch))
    losses.append(float(metrics['loss']))
  return losses, state, base


@pytest.fixture(scope='module')
def one_device():
  return _train(Partitioner((1, 1, 1), devices=jax.devices()[:1]))


def test_adapters_split_as_their_kernels_and_train_as_on_one_device(one_device):
  losses, state, base = one_device
  partitioner = Partitioner((2, 2, 2), rules='model_parallel')
  theirs_losses, theirs, theirs_base = _train(partitioner)
  attention = theirs.params['decoder']['layers_0']['self_attention']
  # B [r, K=2, H=8] of key / value over model=2; A [D, r] replicated (embed
  # is not split by the model-parallel rules).
  assert attention['key']['lora_b'].addressable_shards[0].data.shape == (4, 1, 8)
  assert attention['value']['lora_b'].addressable_shards[0].data.shape == (4, 1, 8)
  assert attention['query']['lora_b'].addressable_shards[0].data.shape == (4, 16)
  assert attention['key']['lora_a'].addressable_shards[0].data.shape == (32, 4)
  frozen_key = theirs.frozen['base']['decoder']['layers_0']['self_attention']['key']['kernel']
  assert frozen_key.addressable_shards[0].data.shape == (32, 1, 8)
  np.testing.assert_allclose(theirs_losses, losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         jax.device_get(theirs.params), jax.device_get(state.params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, theirs_base, base)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(theirs.frozen['base']), base)
