"""BERT encoder: shapes, names, masking, MLM + NSP loss, score and training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from t5x_lite import losses
from t5x_lite import optimizers
from t5x_lite import trainer
from t5x_lite.models import encoder as enc
from t5x_lite.partitioning import Partitioner

import families
from conftest import assert_logical_names

TINY = families.config('bert', emb_dim=32, mlp_dim=64)
ALLOWED = {'vocab', 'embed', 'heads', 'kv', 'joined_kv', 'mlp', 'abspos'}


def random_batch(seed=0, batch=2, length=7, vocab=64):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, vocab, (batch, length)).astype(np.int32)
  tokens[1, 4:] = 0
  segments = np.zeros_like(tokens)
  segments[:, 3:] = 1
  segments[1, 4:] = 0
  targets = rng.integers(2, vocab, (batch, length)).astype(np.int32)
  weights = np.zeros_like(tokens)
  weights[0, [1, 4, 5]] = 1
  weights[1, [2]] = 1
  return dict(input_tokens=tokens, segment_ids=segments, targets=targets,
              loss_weights=weights,
              next_sentence_label=np.array([0, 1], np.int32))


def setup_model(cfg=TINY, **kwargs):
  model = enc.EncoderModel(cfg, **kwargs)
  batch = random_batch(vocab=cfg.vocab_size)
  params = nn.unbox(model.init(jax.random.key(0), batch))['params']
  return model, params, batch


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def num_params_formula(cfg: enc.BertConfig) -> int:
  d, inner, f, v = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  layer = 3 * (d * inner + inner) + inner * d + d + 2 * d * f + f + d + 4 * d
  embed = (v + cfg.max_positions + cfg.type_vocab_size) * d + 2 * d
  heads = (d * d + d) + (d * d + d + 2 * d + v) + (2 * d + 2)
  return embed + cfg.num_layers * layer + heads


def test_logits_shapes_and_dtype():
  model, params, batch = setup_model()
  logits = model.logits(params, batch)
  assert logits.shape == (2, 7, 64) and logits.dtype == jnp.float32
  assert model.nsp_logits(params, batch).shape == (2, 2)
  seq, pooled = model.encode(params, batch)
  assert seq.shape == (2, 7, 32) and pooled.shape == (2, 32)
  assert np.isfinite(np.asarray(logits)).all()


def test_sizes_and_param_count():
  _, params, _ = setup_model()
  assert count(params) == num_params_formula(TINY)
  assert num_params_formula(enc.BERT_BASE) == 110_106_428
  large = enc.EncoderModel(enc.BERT_LARGE)
  shapes = jax.eval_shape(large.init, jax.random.key(0), large.dummy_batch(1, 4))
  assert count(nn.unbox(shapes)['params']) == num_params_formula(enc.BERT_LARGE)
  assert (enc.BERT_LARGE.num_layers, enc.BERT_LARGE.emb_dim,
          enc.BERT_LARGE.num_heads, enc.BERT_LARGE.mlp_dim) == (24, 1024, 16, 4096)
  assert set(enc.SIZES) == {'tiny', 'base', 'large'}


def test_param_tree_names():
  _, params, _ = setup_model()
  assert set(params) == {'token_embedder', 'position_embedder',
                         'segment_embedder', 'embedding_norm', 'encoder',
                         'pooler', 'mlm_head', 'nsp_head'}
  layer = params['encoder']['layers_0']
  assert set(layer) == {'attention', 'post_attention_layer_norm', 'mlp',
                        'post_mlp_layer_norm'}
  assert layer['attention']['query']['kernel'].shape == (32, 16)
  assert layer['attention']['out']['bias'].shape == (32,)
  assert layer['mlp']['wi']['kernel'].shape == (32, 64)
  assert params['mlm_head']['output_bias'].shape == (64,)
  assert params['nsp_head']['kernel'].shape == (32, 2)
  assert params['position_embedder']['embedding'].shape == (16, 32)


def test_every_param_has_logical_names():
  model = enc.EncoderModel(TINY)
  # The NSP head's two classes are the one unnamed axis.
  assert_logical_names(model, model.dummy_batch(2, 4), ALLOWED, unnamed_last_axis=('nsp_head',))


def test_padding_does_not_change_valid_positions():
  model, params, batch = setup_model()
  padded = {k: (np.pad(v, ((0, 0), (0, 5))) if v.ndim == 2 else v)
            for k, v in batch.items()}
  a = np.asarray(model.logits(params, batch))
  b = np.asarray(model.logits(params, padded))
  valid = batch['input_tokens'] > 0
  np.testing.assert_allclose(a[valid], b[:, :7][valid], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.nsp_logits(params, batch),
                             model.nsp_logits(params, padded), atol=1e-5)
  # What sits at padded positions does not matter either.
  other = dict(batch, input_tokens=batch['input_tokens'].copy(),
               attention_mask=batch['input_tokens'] > 0)
  other['input_tokens'][1, 4:] = 17
  c = np.asarray(model.logits(params, other))
  np.testing.assert_allclose(a[valid], c[valid], rtol=1e-5, atol=1e-5)


def test_segment_ids_and_positions_matter():
  model, params, batch = setup_model()
  a = np.asarray(model.logits(params, batch))
  flipped = dict(batch, segment_ids=1 - batch['segment_ids'])
  assert not np.allclose(a, np.asarray(model.logits(params, flipped)))
  with pytest.raises(ValueError, match='max_positions'):
    model.logits(params, random_batch(length=17))


def test_loss_and_metrics():
  model, params, batch = setup_model(nsp_weight=0.5)
  loss, m = model.loss_fn(params, batch, None)
  logits = np.asarray(model.logits(params, batch))
  weights = batch['loss_weights']
  total, _, w = losses.cross_entropy_with_logits(logits, batch['targets'],
                                                 weights)
  np.testing.assert_allclose(m['mlm_loss'], total / w, rtol=1e-6)
  nsp = np.asarray(model.nsp_logits(params, batch), np.float64)
  logp = nsp - np.log(np.exp(nsp).sum(-1, keepdims=True))
  want_nsp = -logp[[0, 1], batch['next_sentence_label']].mean()
  np.testing.assert_allclose(m['nsp_loss'], want_nsp, rtol=1e-5)
  np.testing.assert_allclose(loss, m['mlm_loss'] + 0.5 * m['nsp_loss'],
                             rtol=1e-6)
  assert float(m['loss']) == float(loss)
  correct = (logits.argmax(-1) == batch['targets']) * weights
  np.testing.assert_allclose(m['mlm_accuracy'], correct.sum() / weights.sum())
  assert float(m['accuracy']) == float(m['mlm_accuracy'])
  nsp_acc = (nsp.argmax(-1) == batch['next_sentence_label']).mean()
  np.testing.assert_allclose(m['nsp_accuracy'], nsp_acc)
  assert float(m['num_tokens']) == 4 and float(m['num_examples']) == 2

  no_nsp = {k: v for k, v in batch.items() if k != 'next_sentence_label'}
  loss_mlm, m2 = model.loss_fn(params, no_nsp, None)
  np.testing.assert_allclose(loss_mlm, m['mlm_loss'], rtol=1e-6)
  assert 'nsp_loss' not in m2


def test_score_is_weighted_sum_of_mlm_log_probs():
  model, params, batch = setup_model()
  scores = np.asarray(model.score(params, batch))
  logits = np.asarray(model.logits(params, batch), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  at = np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  assert scores.shape == (2,)
  np.testing.assert_allclose(scores, (at * batch['loss_weights']).sum(-1),
                             rtol=1e-5)


def test_dropout_only_with_rng_and_rate():
  cfg = enc.BertConfig(**{**TINY.__dict__, 'dropout_rate': 0.2,
                          'attention_dropout_rate': 0.2})
  model, params, batch = setup_model(cfg)
  no_rng = model.loss_fn(params, batch, None)[0]
  r1 = model.loss_fn(params, batch, jax.random.key(1))[0]
  r2 = model.loss_fn(params, batch, jax.random.key(2))[0]
  assert r1 == model.loss_fn(params, batch, jax.random.key(1))[0]
  assert r1 != r2 and r1 != no_rng
  plain, _, _ = setup_model()
  np.testing.assert_allclose(plain.loss_fn(params, batch, jax.random.key(1))[0],
                             plain.loss_fn(params, batch, None)[0])


def test_gradients_reach_every_param():
  model, params, batch = setup_model()
  grads, _ = jax.jit(jax.grad(model.loss_fn, has_aux=True))(params, batch, None)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, path


def test_constraints_bind_under_mesh_and_rules():
  model, params, batch = setup_model()
  p = Partitioner((1, 1), devices=jax.devices()[:1])
  with p.activate():
    hlo = jax.jit(model.logits).lower(params, batch).as_text()
    logits = jax.jit(model.logits)(params, batch)
  assert 'sharding' in hlo
  np.testing.assert_allclose(logits, model.logits(params, batch), rtol=1e-5,
                             atol=1e-6)


def test_trainer_reduces_mlm_loss():
  model = enc.EncoderModel(TINY)
  rng = np.random.default_rng(0)
  batch = model.dummy_batch(4, 8)
  batch['input_tokens'] = rng.integers(2, 64, (4, 8)).astype(np.int32)
  batch['targets'] = rng.integers(2, 64, (4, 8)).astype(np.int32)
  batch['segment_ids'][:, 4:] = 1
  batch['next_sentence_label'] = np.array([0, 1, 0, 1], np.int32)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  p = Partitioner(devices=jax.devices()[:1])
  t = trainer.Trainer(model, optimizers.adamw(1e-3), p, shapes)
  state = t.init_state(0)
  device_batch = p.shard_batch(batch)
  history = []
  for _ in range(6):
    state, metrics = t.train_step(state, device_batch)
    history.append(metrics)
  first, last = float(history[0]['mlm_loss']), float(history[-1]['mlm_loss'])
  assert last < first - 0.05, (first, last)
  assert {'loss', 'accuracy', 'nsp_loss', 'learning_rate'} <= set(history[-1])
  assert int(state.step) == 6


def test_bfloat16_activations_keep_float32_params_and_logits():
  cfg = enc.BertConfig(**{**TINY.__dict__, 'dtype': 'bfloat16'})
  model, params, batch = setup_model(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert model.logits(params, batch).dtype == jnp.float32
  ref, _, _ = setup_model()
  np.testing.assert_allclose(model.loss_fn(params, batch, None)[0],
                             ref.loss_fn(params, batch, None)[0], rtol=5e-2)
