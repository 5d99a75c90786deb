"""BART encoder-decoder: names, packing, causality, masking, training, score."""

import dataclasses

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import linen as nn

from t5x_lite import gin_utils
from t5x_lite import optimizers
from t5x_lite import trainer
from t5x_lite.models import bart
from t5x_lite.partitioning import Partitioner

import families
from conftest import assert_logical_names

TINY = families.config('bart', emb_dim=32, num_heads=4, mlp_dim=48, max_positions=40,
                       initializer_range=0.2)
ALLOWED = {'vocab', 'embed', 'heads', 'kv', 'joined_kv', 'mlp', 'abspos'}
LENGTHS = {'inputs': 16, 'targets': 8}
EXAMPLES = [([5, 6, 7, 8, 9, 1], [11, 12, 1]),
            ([20, 21, 22, 1], [30, 31, 32, 33, 1]),
            ([40, 41, 42, 43, 44, 45, 46, 1], [50, 1]),
            ([13, 14, 1], [15, 16, 17, 1])]


def converted(pack: bool) -> list:
  """Real seqio.EncDecFeatureConverter output for EXAMPLES."""
  ds = tf.data.Dataset.from_generator(
      lambda: iter({'inputs': i, 'targets': t} for i, t in EXAMPLES),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})
  out = seqio.EncDecFeatureConverter(pack=pack)(ds, LENGTHS)
  return list(out.as_numpy_iterator())


def stack(rows: list, num_rows: int = len(EXAMPLES)) -> dict:
  """[num_rows, length] arrays; missing rows are all padding (so that every
  batch here has one shape and eager ops compile once)."""
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return {k: np.pad(v, ((0, num_rows - len(v)), (0, 0)))
          for k, v in out.items()}


def random_params(model, batch, seed=0) -> dict:
  """Params of the model's tree: LN scales near 1, the rest N(0, 0.2^2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return 1 + 0.1 * noise if is_scale else 0.2 * noise

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes)['params'])


@pytest.fixture(scope='module')
def setup():
  model = bart.BartModel(TINY)
  batch = stack(converted(pack=False))
  return model, random_params(model, batch), batch


def test_every_param_has_allowed_logical_names():
  model = bart.BartModel(TINY)
  assert_logical_names(model, model.dummy_batch(2, 5, 4), ALLOWED)


def test_param_tree_and_sizes():
  model = bart.BartModel(TINY)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   model.dummy_batch(1, 5, 4)))['params']
  assert set(shapes) == {'token_embedder', 'final_logits_bias', 'encoder',
                         'decoder'}
  assert shapes['encoder']['position_embedder']['embedding'].shape == (42, 32)
  assert set(shapes['decoder']['layers_1']) == {
      'self_attention', 'post_self_attention_layer_norm',
      'encoder_decoder_attention', 'post_cross_attention_layer_norm', 'mlp',
      'post_mlp_layer_norm'}
  assert bart.SIZES['tiny'].vocab_size == 8192
  assert bart.BART_LARGE.num_encoder_layers == 12


@pytest.mark.parametrize('size,dropout', [('tiny', 0.0), ('base', 0.1),
                                          ('large', 0.1)])
def test_gin_model_configs_match_sizes(size, dropout):
  gin.clear_config()
  gin_utils.parse_gin([f'configs/models/bart_{size}.gin'], [])
  model = gin.query_parameter('MODEL/gin.macro.value').scoped_configurable_fn()
  gin.clear_config()
  assert isinstance(model, bart.BartModel)
  assert model.config == dataclasses.replace(bart.SIZES[size],
                                             dropout_rate=dropout)
  assert model.config.pad_id == 0 and model.z_loss == 0.0


def test_packed_segments_equal_unpacked_examples(setup):
  model, params, unpacked = setup
  rows = converted(pack=True)
  assert len(rows) < len(EXAMPLES)  # really packed
  packed = stack(rows)
  assert {'encoder_segment_ids', 'decoder_positions'} <= set(packed)
  alone = np.asarray(model.logits(params, unpacked))
  together = np.asarray(model.logits(params, packed))
  seen = 0
  for row, segs in enumerate(packed['decoder_segment_ids']):
    for s in range(1, segs.max() + 1):
      at = segs == s
      targets = packed['decoder_target_tokens'][row][at]
      i = [list(t) for _, t in EXAMPLES].index(list(targets))
      np.testing.assert_allclose(together[row][at], alone[i, :at.sum()],
                                 atol=1e-5)
      seen += 1
  assert seen == len(EXAMPLES)
  # Loss metrics agree as well (same tokens, same weights).
  _, m_packed = model.loss_fn(params, packed, None)
  _, m_alone = model.loss_fn(params, unpacked, None)
  for key in ('loss', 'accuracy', 'num_tokens', 'num_examples'):
    np.testing.assert_allclose(m_packed[key], m_alone[key], rtol=1e-5)


def test_decoder_is_causal_and_padding_is_masked(setup):
  model, params, batch = setup
  changed = {k: v.copy() for k, v in batch.items()}
  changed['decoder_input_tokens'][1, 3] = 33
  a = np.asarray(model.logits(params, batch))
  b = np.asarray(model.logits(params, changed))
  np.testing.assert_allclose(a[1, :3], b[1, :3], atol=1e-6)
  assert not np.allclose(a[1, 3], b[1, 3])
  # Encoder tokens and decoder inputs behind padding do not matter.
  other = {k: v.copy() for k, v in batch.items()}
  other['encoder_input_tokens'][0, 6:] = 0
  other['decoder_input_tokens'][0, 3:] = 17
  c = np.asarray(model.logits(params, other))
  np.testing.assert_allclose(a[0, :3], c[0, :3], atol=1e-6)


def test_pad_id_and_explicit_masks(setup):
  model, params, batch = setup
  want = np.asarray(model.logits(params, batch))
  # The same batch with pad id 3 instead of 0 (no real token is 3).
  cfg3 = dataclasses.replace(TINY, pad_id=3)
  model3 = bart.BartModel(cfg3)
  pad = batch['decoder_target_tokens'] == 0
  shifted = dict(batch)
  shifted['encoder_input_tokens'] = np.where(
      batch['encoder_input_tokens'] == 0, 3, batch['encoder_input_tokens'])
  for k in ('decoder_input_tokens', 'decoder_target_tokens'):
    shifted[k] = np.where(pad, 3, batch[k])  # the start token stays 0
  got = np.asarray(model3.logits(params, shifted))
  real = batch['decoder_target_tokens'] > 0
  np.testing.assert_allclose(got[real], want[real], atol=1e-5)
  # Explicit masks override the pad id.
  masks = dict(shifted, decoder_attention_mask=real,
               encoder_attention_mask=batch['encoder_input_tokens'] > 0)
  got = np.asarray(model.logits(params, masks))
  np.testing.assert_allclose(got[real], want[real], atol=1e-5)
  no_weights = {k: v for k, v in shifted.items() if k != 'decoder_loss_weights'}
  _, m = model3.loss_fn(params, no_weights, None)
  assert float(m['num_tokens']) == real.sum()


def test_score_is_weighted_sum_of_target_log_probs(setup):
  model, params, batch = setup
  scores = np.asarray(model.score(params, batch))
  logits = np.asarray(model.logits(params, batch), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tgt = batch['decoder_target_tokens']
  at_targets = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  want = (at_targets * batch['decoder_loss_weights']).sum(-1)
  assert scores.shape == (len(EXAMPLES),)
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  loss, _ = model.loss_fn(params, batch, None)
  num_tokens = batch['decoder_loss_weights'].sum()
  np.testing.assert_allclose(-scores.sum() / num_tokens, loss, rtol=1e-5)


def test_dropout_needs_rng_and_a_rate(setup):
  model, params, batch = setup
  plain = model.loss_fn(params, batch, None)[0]
  with_rng = model.loss_fn(params, batch, jax.random.key(1))[0]
  np.testing.assert_array_equal(with_rng, plain)  # all rates are 0 in TINY
  rated = bart.BartModel(dataclasses.replace(
      TINY, dropout_rate=0.1, attention_dropout_rate=0.1,
      activation_dropout_rate=0.1))
  np.testing.assert_array_equal(rated.loss_fn(params, batch, None)[0], plain)


def test_trains_under_trainer_with_model_parallel_rules(setup):
  """AdamW steps with dropout on one fixed batch reduce the loss.

  Only activation dropout is on: it is enough to check that any non-zero
  rate enables dropout, and each dropout site costs seconds of compilation.
  """
  _, _, batch = setup
  cfg = dataclasses.replace(TINY, num_encoder_layers=1, num_decoder_layers=1,
                            activation_dropout_rate=0.1)
  model = bart.BartModel(cfg)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  p = Partitioner((1, 1), rules='model_parallel')
  t = trainer.Trainer(model, optimizers.adamw(1e-2, weight_decay=0.0), p,
                      shapes)
  state = t.init_state(0)
  initial_params = jax.device_get(state.params)
  history = []
  for _ in range(6):
    state, metrics = t.train_step(state, p.shard_batch(batch))
    history.append(float(metrics['loss']))
  assert np.isfinite(history).all()
  assert history[-1] < 0.8 * history[0], history
  no_dropout = float(model.loss_fn(initial_params, batch, None)[0])
  assert history[0] != no_dropout
  np.testing.assert_allclose(history[0], no_dropout, rtol=0.2)
