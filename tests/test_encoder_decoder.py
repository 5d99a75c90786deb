"""T5.1.1 encoder-decoder: shapes, sizes, names, masking, loss and score."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from t5x_lite import losses
from t5x_lite.models import encoder_decoder as ed

import families
from conftest import assert_logical_names

TINY = families.config('t5', emb_dim=32, mlp_dim=64)
ALLOWED = {'vocab', 'embed', 'heads', 'kv', 'joined_kv', 'mlp',
           'relpos_buckets', 'layers'}


def shift_right(targets, segment_ids=None):
  """Decoder inputs: targets shifted right, 0 at the start of each segment."""
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  if segment_ids is not None:
    starts = np.ones_like(segment_ids, bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    inputs[starts] = 0
  return inputs


def random_batch(seed=0, batch=2, in_len=7, tgt_len=6, vocab=64):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (batch, in_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, (batch, tgt_len)).astype(np.int32)
  enc[1, 4:] = 0
  tgt[1, 3:] = 0
  return dict(encoder_input_tokens=enc, decoder_input_tokens=shift_right(tgt),
              decoder_target_tokens=tgt,
              decoder_loss_weights=(tgt > 0).astype(np.int32))


def setup_model(cfg=TINY, **kwargs):
  model = ed.EncoderDecoderModel(cfg, **kwargs)
  batch = random_batch(vocab=cfg.vocab_size)
  params = nn.unbox(model.init(jax.random.key(0), batch))['params']
  return model, params, batch


def num_params_formula(cfg: ed.T5Config) -> int:
  d, inner, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  attn = 4 * d * inner
  mlp = (len(cfg.mlp_activations) + 1) * d * f
  relpos = cfg.num_heads * cfg.relative_attention_num_buckets
  enc = cfg.num_encoder_layers * (attn + mlp + 2 * d) + relpos + d
  dec = cfg.num_decoder_layers * (2 * attn + mlp + 3 * d) + relpos + d
  embed = cfg.vocab_size * d * (1 if cfg.logits_via_embedding else 2)
  return embed + enc + dec


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_logits_shape_and_dtype():
  model, params, batch = setup_model()
  logits = model.logits(params, batch)
  assert logits.shape == (2, 6, 64) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_t5_1_1_base_param_count():
  base = ed.T5Config(vocab_size=32128, emb_dim=768, num_heads=12, head_dim=64,
                     mlp_dim=2048, num_encoder_layers=12, num_decoder_layers=12)
  model = ed.EncoderDecoderModel(base)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          model.dummy_batch(1, 8, 8))
  # Same number as HF T5ForConditionalGeneration(google/t5-v1_1-base config).
  assert count(nn.unbox(shapes)['params']) == 247_577_856
  assert num_params_formula(base) == 247_577_856


@pytest.mark.parametrize('tied', [False, True])
def test_param_count_formula_tiny(tied):
  cfg = ed.T5Config(**{**TINY.__dict__, 'logits_via_embedding': tied})
  _, params, _ = setup_model(cfg)
  assert count(params) == num_params_formula(cfg)
  assert ('logits_dense' in params['decoder']) == (not tied)


def test_every_param_has_allowed_logical_names():
  model = ed.EncoderDecoderModel(TINY)
  assert_logical_names(model, model.dummy_batch(2, 4, 3), ALLOWED)


def test_param_tree_uses_t5x_names():
  _, params, _ = setup_model()
  assert set(params) == {'token_embedder', 'encoder', 'decoder'}
  enc, dec = params['encoder'], params['decoder']
  assert enc['relpos_bias']['rel_embedding'].shape == (2, 32)
  assert set(enc['layers_0']) == {'pre_attention_layer_norm', 'attention',
                                  'pre_mlp_layer_norm', 'mlp'}
  assert set(dec['layers_1']) == {
      'pre_self_attention_layer_norm', 'self_attention',
      'pre_cross_attention_layer_norm', 'encoder_decoder_attention',
      'pre_mlp_layer_norm', 'mlp'}
  assert enc['layers_0']['attention']['query']['kernel'].shape == (32, 16)
  assert dec['logits_dense']['kernel'].shape == (32, 64)
  assert 'encoder_norm' in enc and 'decoder_norm' in dec


def packed_batch(seg2_shift=0):
  """One row holding two examples; seg2_shift alters only segment 2 tokens."""
  enc_seg = np.array([[1] * 6 + [2] * 5 + [0] * 3])
  dec_seg = np.array([[1] * 4 + [2] * 5 + [0] * 2])
  rng = np.random.default_rng(1)
  enc = rng.integers(2, 50, enc_seg.shape) * (enc_seg > 0)
  tgt = rng.integers(2, 50, dec_seg.shape) * (dec_seg > 0)
  enc = np.where(enc_seg == 2, enc + seg2_shift, enc).astype(np.int32)
  tgt = np.where(dec_seg == 2, tgt + seg2_shift, tgt).astype(np.int32)

  def positions(seg):
    pos = np.zeros_like(seg)
    for s in (1, 2):
      pos[seg == s] = np.arange((seg == s).sum())
    return pos

  return dict(encoder_input_tokens=enc, decoder_target_tokens=tgt,
              decoder_input_tokens=shift_right(tgt, dec_seg),
              decoder_loss_weights=(tgt > 0).astype(np.int32),
              encoder_segment_ids=enc_seg.astype(np.int32),
              decoder_segment_ids=dec_seg.astype(np.int32),
              encoder_positions=positions(enc_seg).astype(np.int32),
              decoder_positions=positions(dec_seg).astype(np.int32))


def test_packed_segments_do_not_interact():
  model, params, _ = setup_model()
  a = np.asarray(model.logits(params, packed_batch(0)))
  b = np.asarray(model.logits(params, packed_batch(7)))
  np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[0, 4:9], b[0, 4:9])


def test_packed_segment_equals_example_alone():
  model, params, _ = setup_model()
  packed = packed_batch()
  logits = np.asarray(model.logits(params, packed))
  enc_seg, dec_seg = packed['encoder_segment_ids'], packed['decoder_segment_ids']
  alone_tgt = packed['decoder_target_tokens'][dec_seg == 2][None]
  alone = dict(
      encoder_input_tokens=packed['encoder_input_tokens'][enc_seg == 2][None],
      decoder_target_tokens=alone_tgt,
      decoder_input_tokens=shift_right(alone_tgt))
  want = np.asarray(model.logits(params, alone))
  np.testing.assert_allclose(logits[0, 4:9], want[0], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal():
  model, params, batch = setup_model()
  changed = dict(batch)
  changed['decoder_input_tokens'] = batch['decoder_input_tokens'].copy()
  changed['decoder_input_tokens'][0, 4] = 33
  a = np.asarray(model.logits(params, batch))
  b = np.asarray(model.logits(params, changed))
  np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-5, atol=1e-6)
  assert not np.allclose(a[0, 4], b[0, 4])


def test_padding_does_not_change_valid_positions():
  model, params, batch = setup_model()
  padded = dict(batch)
  for k in batch:
    padded[k] = np.pad(batch[k], ((0, 0), (0, 5)))
  a = np.asarray(model.logits(params, batch))
  b = np.asarray(model.logits(params, padded))
  valid = batch['decoder_target_tokens'] > 0
  np.testing.assert_allclose(a[valid], b[:, :6][valid], rtol=1e-5, atol=1e-5)
  # Decoder inputs at positions whose target is padding are masked out.
  other = dict(batch)
  other['decoder_input_tokens'] = batch['decoder_input_tokens'].copy()
  other['decoder_input_tokens'][1, 3:] = 17
  c = np.asarray(model.logits(params, other))
  np.testing.assert_allclose(a[1, :3], c[1, :3], rtol=1e-5, atol=1e-6)


def test_loss_metrics_and_normalisation():
  model, params, batch = setup_model(z_loss=1e-4)
  loss, m = model.loss_fn(params, batch, None)
  logits = model.logits(params, batch)
  weights = batch['decoder_loss_weights']
  total, z, w = losses.cross_entropy_with_logits(
      logits, batch['decoder_target_tokens'], weights, z_loss=1e-4)
  np.testing.assert_allclose(loss, total / w, rtol=1e-6)
  np.testing.assert_allclose(m['loss'], m['cross_ent_loss'] + m['z_loss'],
                             rtol=1e-6)
  assert float(m['num_tokens']) == weights.sum() == 9
  assert float(m['num_examples']) == 2
  correct = (np.argmax(logits, -1) == batch['decoder_target_tokens']) * weights
  np.testing.assert_allclose(m['accuracy'], correct.sum() / weights.sum())

  same = ed.EncoderDecoderModel(TINY, loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  np.testing.assert_allclose(same.loss_fn(params, batch, None)[0], loss,
                             rtol=1e-6)
  const = ed.EncoderDecoderModel(TINY, loss_normalizing_factor=233472.0)
  np.testing.assert_allclose(const.loss_fn(params, batch, None)[0],
                             total / 233472.0, rtol=1e-6)
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    ed.EncoderDecoderModel(TINY, loss_normalizing_factor='NUM_TOKENS')


def test_loss_weights_default_and_packed_example_count():
  model, params, _ = setup_model()
  batch = packed_batch()
  del batch['decoder_loss_weights']
  _, m = model.loss_fn(params, batch, None)
  assert float(m['num_tokens']) == 9 and float(m['num_examples']) == 2


def test_label_smoothing_is_used():
  _, params, batch = setup_model()
  plain = ed.EncoderDecoderModel(TINY, z_loss=0.0)
  smooth = ed.EncoderDecoderModel(TINY, z_loss=0.0, label_smoothing=0.1)
  assert not np.isclose(plain.loss_fn(params, batch, None)[0],
                        smooth.loss_fn(params, batch, None)[0])


def test_score_is_weighted_sum_of_target_log_probs():
  model, params, batch = setup_model()
  scores = np.asarray(model.score(params, batch))
  logits = np.asarray(model.logits(params, batch), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tgt = batch['decoder_target_tokens']
  at_targets = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  want = (at_targets * batch['decoder_loss_weights']).sum(-1)
  assert scores.shape == (2,)
  np.testing.assert_allclose(scores, want, rtol=1e-5)


def test_dropout_only_with_rng_and_rate():
  cfg = ed.T5Config(**{**TINY.__dict__, 'dropout_rate': 0.3})
  model, params, batch = setup_model(cfg)
  no_rng = model.loss_fn(params, batch, None)[0]
  np.testing.assert_allclose(no_rng, model.loss_fn(params, batch, None)[0])
  r1 = model.loss_fn(params, batch, jax.random.key(1))[0]
  r1_again = model.loss_fn(params, batch, jax.random.key(1))[0]
  r2 = model.loss_fn(params, batch, jax.random.key(2))[0]
  assert r1 == r1_again and r1 != r2 and r1 != no_rng
  zero_rate, params0, _ = setup_model(TINY)
  np.testing.assert_allclose(zero_rate.loss_fn(params0, batch, jax.random.key(1))[0],
                             zero_rate.loss_fn(params0, batch, None)[0])


def test_gradients_are_finite_and_reach_every_param():
  model, params, batch = setup_model()
  grad_fn = jax.jit(jax.grad(model.loss_fn, has_aux=True))
  grads, _ = grad_fn(params, batch, jax.random.key(0))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).sum() > 0, path


def test_bfloat16_activations_keep_float32_params_and_logits():
  cfg = ed.T5Config(**{**TINY.__dict__, 'dtype': 'bfloat16'})
  model, params, batch = setup_model(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert model.logits(params, batch).dtype == jnp.float32
  ref_model, _, _ = setup_model(TINY)
  np.testing.assert_allclose(model.loss_fn(params, batch, None)[0],
                             ref_model.loss_fn(params, batch, None)[0],
                             rtol=5e-2)


def test_init_accepts_shape_structs_and_reports_missing_features():
  model = ed.EncoderDecoderModel(TINY)
  structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in model.dummy_batch(2, 7, 6).items()}
  variables = model.init(jax.random.key(0), structs)
  assert count(nn.unbox(variables)['params']) == num_params_formula(TINY)
  with pytest.raises(KeyError, match='decoder_target_tokens'):
    model.init(jax.random.key(0), {'encoder_input_tokens': np.ones((1, 2))})


def test_activations_are_constrained_under_rules():
  # With a mesh and rules in place, apply must still run (constraints bind).
  model, params, batch = setup_model()
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rules = (('batch', 'data'), ('vocab', None), ('embed', None), ('mlp', None),
           ('heads', None), ('kv', None), ('joined_kv', None),
           ('length', None), ('relpos_buckets', None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    hlo = jax.jit(model.logits).lower(params, batch).as_text()
    logits = jax.jit(model.logits)(params, batch)
  assert 'sharding' in hlo
  np.testing.assert_allclose(logits, model.logits(params, batch), rtol=1e-5,
                             atol=1e-6)


def test_relative_bias_once_per_stack_and_no_vocab_one_hot():
  cfg = ed.T5Config(**{**TINY.__dict__, 'vocab_size': 72})
  model, params, batch = setup_model(cfg)
  jaxpr = str(jax.make_jaxpr(model.loss_fn)(params, batch, None))
  # Two relative-bias gathers (one per stack), two embedding lookups and the
  # target log-prob gather of the loss.
  assert jaxpr.count('gather[') == 5
  # Nothing shaped like a one-hot of the encoder tokens ([2, 7, V]) or any
  # boolean over the vocabulary.
  assert '[2,7,72]' not in jaxpr
  assert not re.search(r'bool\[[\d,]*72\]', jaxpr)
