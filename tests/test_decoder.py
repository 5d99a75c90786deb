"""GPT decoder: names, init, LM / prefix-LM masks on real seqio features,
packing, loss and score (training on a model-parallel mesh: tests/multidevice)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import linen as nn

from t5x_lite import layers
from t5x_lite import losses
from t5x_lite.models import decoder as dec

import families
from conftest import assert_logical_names

TINY = families.config('gpt', emb_dim=32, num_heads=4, mlp_dim=64, max_positions=32)
ALLOWED = {'vocab', 'embed', 'heads', 'kv', 'joined_kv', 'mlp', 'abspos'}

# (inputs, targets) pairs; LM tasks use their concatenation as 'targets'.
EXAMPLES = [([7, 8, 9, 10], [3, 4, 5]), ([11, 12], [13, 14, 15, 16]),
            ([20, 21, 22], [23])]


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def num_params_formula(cfg: dec.GPTConfig) -> int:
  d, inner, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  layer = (4 * d + 3 * (d * inner + inner) + inner * d + d +
           d * f + f + f * d + d)
  embed = (cfg.vocab_size + cfg.max_positions) * d
  return embed + cfg.num_layers * layer + 2 * d


@functools.lru_cache(maxsize=None)
def setup_model():
  """(TINY model, its params), initialised once."""
  model = dec.DecoderModel(TINY)
  init = jax.jit(model.init)
  params = nn.unbox(init(jax.random.key(0), model.dummy_batch(2, 8)))
  return model, params['params']


def converted(examples=EXAMPLES, prefix_lm=True, pack=False, length=12):
  """Rows of the real seqio.DecoderFeatureConverter output, as numpy."""
  if prefix_lm:
    rows = [dict(inputs=i, targets=t) for i, t in examples]
    lengths = {'inputs': length // 2, 'targets': length - length // 2}
  else:
    rows = [dict(targets=i + t) for i, t in examples]
    lengths = {'targets': length}
  ds = tf.data.Dataset.from_generator(
      lambda: iter(rows),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in rows[0]})
  out = seqio.DecoderFeatureConverter(pack=pack)(ds, lengths)
  batch = list(out.as_numpy_iterator())
  return {k: np.stack([ex[k] for ex in batch]) for k in batch[0]}


def test_sizes_param_count_and_tree():
  model, params = setup_model()
  assert count(params) == num_params_formula(TINY)
  assert num_params_formula(dec.GPT2_SMALL) == 124_439_808
  assert num_params_formula(dec.GPT2_MEDIUM) == 354_823_168
  assert num_params_formula(dec.GPT2_LARGE) == 774_030_080
  assert set(dec.SIZES) == {'tiny', 'small', 'medium', 'large'}
  assert (dec.GPT_TINY.vocab_size, dec.GPT_TINY.emb_dim,
          dec.GPT_TINY.num_layers) == (8192, 128, 4)
  assert set(params) == {'token_embedder', 'position_embedder', 'decoder'}
  layer = params['decoder']['layers_0']
  assert set(layer) == {'pre_self_attention_layer_norm', 'self_attention',
                        'pre_mlp_layer_norm', 'mlp'}
  assert layer['self_attention']['query']['kernel'].shape == (32, 32)
  assert layer['mlp']['wo']['kernel'].shape == (64, 32)
  assert params['position_embedder']['embedding'].shape == (32, 32)
  assert model.logits(params, model.dummy_batch(2, 8)).dtype == jnp.float32


def test_every_param_has_logical_names():
  model = dec.DecoderModel(TINY)
  assert_logical_names(model, model.dummy_batch(2, 4), ALLOWED)


def test_gpt2_init_scales_residual_projections():
  _, params = setup_model()  # 2 layers: residual projections get std 0.01
  layer = params['decoder']['layers_1']
  std = lambda path: float(np.std(np.asarray(path['kernel'])))
  for x in (layer['self_attention']['query'], layer['mlp']['wi']):
    assert abs(std(x) - 0.02) < 0.0015
  for x in (layer['self_attention']['out'], layer['mlp']['wo']):
    assert abs(std(x) - 0.02 / 2.0) < 0.0008  # 0.02 / sqrt(2 * num_layers)
  assert float(np.std(params['token_embedder']['embedding'])) == pytest.approx(
      0.02, rel=0.1)
  np.testing.assert_array_equal(layer['pre_mlp_layer_norm']['scale'], 1.0)
  np.testing.assert_array_equal(layer['mlp']['wo']['bias'], 0.0)


def test_lm_features_give_a_causal_padded_mask():
  batch = converted(prefix_lm=False)
  assert 'decoder_causal_attention' not in batch
  mask = np.asarray(layers.make_decoder_mask(batch['decoder_target_tokens']))
  n = len(EXAMPLES[0][0] + EXAMPLES[0][1])  # 7 real positions in row 0
  want = np.zeros((12, 12), bool)
  want[:n, :n] = np.tril(np.ones((n, n), bool))
  np.testing.assert_array_equal(mask[0, 0], want)
  np.testing.assert_array_equal(batch['decoder_loss_weights'][0],
                                np.arange(12) < n)


def test_prefix_lm_on_real_converter_output():
  batch = converted()
  # Row 0: BOS + 4 inputs form the prefix; targets are predicted from index 4.
  np.testing.assert_array_equal(batch['decoder_input_tokens'][0, :8],
                                [0, 7, 8, 9, 10, 3, 4, 5])
  np.testing.assert_array_equal(batch['decoder_causal_attention'][0],
                                np.arange(12) < 5)
  np.testing.assert_array_equal(batch['decoder_loss_weights'][0],
                                (np.arange(12) >= 4) & (np.arange(12) < 7))
  mask = np.asarray(layers.make_decoder_mask(
      batch['decoder_target_tokens'], batch['decoder_causal_attention']))[0, 0]
  want = np.tril(np.ones((12, 12), bool))
  want[:5, :5] = True  # bidirectional inside the prefix
  want[:, 7:] = want[7:, :] = False  # padding
  np.testing.assert_array_equal(mask, want)

  model, params = setup_model()
  logits = np.asarray(model.logits(params, batch))
  # A later prefix token changes earlier prefix positions (bidirectional)...
  other_input = converted([([7, 8, 30, 10], [3, 4, 5])] + EXAMPLES[1:])
  changed = np.asarray(model.logits(params, other_input))
  assert not np.allclose(changed[0, 1], logits[0, 1], atol=1e-4)
  np.testing.assert_allclose(changed[1:], logits[1:], atol=1e-6)
  # ... a target token changes nothing before it.
  other_target = converted([([7, 8, 9, 10], [3, 40, 5])] + EXAMPLES[1:])
  changed = np.asarray(model.logits(params, other_target))
  np.testing.assert_allclose(changed[0, :6], logits[0, :6], atol=1e-6)
  assert not np.allclose(changed[0, 6], logits[0, 6], atol=1e-4)

  # The loss is on the continuation only.
  loss, metrics = model.loss_fn(params, batch, None)
  logp = np.asarray(losses.log_softmax_at_targets(
      logits, batch['decoder_target_tokens']))
  target_positions = [(0, 4), (0, 5), (0, 6), (1, 2), (1, 3), (1, 4), (1, 5),
                      (2, 3)]
  want = -np.mean([logp[i, j] for i, j in target_positions])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics['num_tokens']) == len(target_positions)
  assert float(metrics['num_examples']) == 3


@pytest.mark.parametrize('prefix_lm', [False, True])
def test_packed_equals_unpacked(prefix_lm):
  model, params = setup_model()
  plain = converted(prefix_lm=prefix_lm)
  packed = converted(prefix_lm=prefix_lm, pack=True)
  assert packed['decoder_segment_ids'].max() > 1  # really packed
  plain_logits = np.asarray(model.logits(params, plain))
  packed_logits = np.asarray(model.logits(params, packed))
  found = 0
  for r, row in enumerate(packed['decoder_segment_ids']):
    for s in range(1, row.max() + 1):
      idx = np.flatnonzero(row == s)
      np.testing.assert_array_equal(packed['decoder_positions'][r, idx],
                                    np.arange(len(idx)))
      targets = packed['decoder_target_tokens'][r, idx]
      i = [k for k, t in enumerate(plain['decoder_target_tokens'])
           if np.array_equal(t[:len(idx)], targets) and t[len(idx)] == 0]
      assert len(i) == 1
      np.testing.assert_allclose(packed_logits[r, idx],
                                 plain_logits[i[0], :len(idx)], atol=1e-5)
      np.testing.assert_array_equal(
          packed['decoder_loss_weights'][r, idx],
          plain['decoder_loss_weights'][i[0], :len(idx)])
      found += 1
  assert found == len(EXAMPLES)
  # Positions restart per segment; without them later segments differ.
  no_positions = {k: v for k, v in packed.items() if k != 'decoder_positions'}
  later = packed['decoder_segment_ids'] > 1
  assert not np.allclose(np.asarray(model.logits(params, no_positions))[later],
                         packed_logits[later], atol=1e-4)
  # Per-example loss sums agree, so the normalised losses do too.
  np.testing.assert_allclose(model.loss_fn(params, packed, None)[0],
                             model.loss_fn(params, plain, None)[0], rtol=1e-5)


def test_score_is_weighted_sum_of_log_probs():
  model, params = setup_model()
  batch = converted()
  scores = np.asarray(model.score(params, batch))
  logits = np.asarray(model.logits(params, batch), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  at = np.take_along_axis(logp, batch['decoder_target_tokens'][..., None],
                          -1)[..., 0]
  assert scores.shape == (3,)
  np.testing.assert_allclose(
      scores, (at * batch['decoder_loss_weights']).sum(-1), rtol=1e-5)


def test_loss_options_dropout_and_errors():
  _, params = setup_model()
  model = dec.DecoderModel(TINY, z_loss=1e-3, loss_normalizing_factor=10.0)
  batch = converted(prefix_lm=False)
  loss, m = model.loss_fn(params, batch, None)
  total, z, _ = losses.cross_entropy_with_logits(
      model.logits(params, batch), batch['decoder_target_tokens'],
      batch['decoder_loss_weights'], z_loss=1e-3)
  np.testing.assert_allclose(loss, total / 10.0, rtol=1e-6)
  np.testing.assert_allclose(m['z_loss'], z / 10.0, rtol=1e-6)
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    dec.DecoderModel(TINY, loss_normalizing_factor='NUM_TOKENS')

  cfg = dec.GPTConfig(**{**TINY.__dict__, 'dropout_rate': 0.2,
                         'attention_dropout_rate': 0.2})
  dropout_model = dec.DecoderModel(cfg)
  r1 = dropout_model.loss_fn(params, batch, jax.random.key(1))[0]
  r2 = dropout_model.loss_fn(params, batch, jax.random.key(2))[0]
  no_rng = dropout_model.loss_fn(params, batch, None)[0]
  assert r1 != r2 and r1 != no_rng
  np.testing.assert_allclose(no_rng, setup_model()[0].loss_fn(
      params, batch, None)[0])

  with pytest.raises(ValueError, match='max_positions'):
    model.logits(params, model.dummy_batch(1, 33))
  with pytest.raises(KeyError, match='decoder_input_tokens'):
    model.logits(params, {'decoder_target_tokens':
                          batch['decoder_target_tokens']})

