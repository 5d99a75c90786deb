"""Building blocks: norms, embedding, dense, relative bias, attention, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from t5x_lite import layers

KEY = jax.random.key(0)


def init_apply(module, *args, **kwargs):
  variables = module.init(KEY, *args, **kwargs)
  params = nn.unbox(variables)
  return variables, module.apply(params, *args, **kwargs)


def test_rms_norm_matches_numpy_and_has_no_bias():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  variables, y = init_apply(layers.RMSNorm(), x)
  assert list(variables['params']) == ['scale']
  want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-5)


def test_rms_norm_bfloat16_output():
  x = jnp.ones((1, 2, 4), jnp.float32)
  _, y = init_apply(layers.RMSNorm(dtype='bfloat16'), x)
  assert y.dtype == jnp.bfloat16


def test_embed_is_gather_and_attend_is_transpose():
  emb = layers.Embed(num_embeddings=10, features=4)
  tokens = jnp.array([[1, 0, 9]])
  variables, x = init_apply(emb, tokens)
  table = nn.unbox(variables)['params']['embedding']
  np.testing.assert_array_equal(x[0], table[np.array([1, 0, 9])])
  logits = emb.apply(nn.unbox(variables), x, method=emb.attend)
  assert logits.shape == (1, 3, 10) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, x @ table.T, rtol=1e-6)
  with pytest.raises(ValueError, match='integer'):
    emb.apply(nn.unbox(variables), jnp.ones((1, 2)))


def test_dense_general_contracts_several_axes_with_true_fan_in():
  x = jnp.ones((2, 3, 4, 8))
  dense = layers.DenseGeneral(features=512, num_contract=2,
                              kernel_axes=('heads', 'kv', 'embed'))
  variables, y = init_apply(dense, x)
  kernel = nn.unbox(variables)['params']['kernel']
  assert kernel.shape == (4, 8, 512) and y.shape == (2, 3, 512)
  np.testing.assert_allclose(y, jnp.einsum('btnh,nhd->btd', x, kernel),
                             rtol=1e-5, atol=1e-6)
  # fan_in = 4 * 8 = 32: std close to 1/sqrt(32).
  assert abs(float(np.std(kernel)) * np.sqrt(32) - 1) < 0.1
  spec = nn.get_partition_spec(variables)['params']['kernel']
  assert tuple(spec) == ('heads', 'kv', 'embed')


@pytest.mark.parametrize('rel,bidirectional,bucket', [
    (0, True, 0), (-1, True, 1), (1, True, 17), (-7, True, 7), (7, True, 23),
    (-8, True, 8), (-16, True, 10), (-1000, True, 15), (1000, True, 31),
    (5, False, 0), (-5, False, 5), (-15, False, 15), (-16, False, 16),
    (-1000, False, 31),
])
def test_relative_position_buckets(rel, bidirectional, bucket):
  got = layers.RelativePositionBias.bucket(
      np.array([rel], np.int32), bidirectional, 32, 128)
  assert int(got[0]) == bucket


def test_relative_position_bias_shape_and_values():
  module = layers.RelativePositionBias(num_heads=3, bidirectional=False)
  variables, bias = init_apply(module, 5, 5)
  table = nn.unbox(variables)['params']['rel_embedding']
  assert table.shape == (3, 32) and bias.shape == (1, 3, 5, 5)
  # Query 4 attending to key 1 is 3 positions back -> bucket 3.
  np.testing.assert_allclose(bias[0, :, 4, 1], table[:, 3])
  np.testing.assert_allclose(bias[0, :, 1, 4], table[:, 0])


@pytest.mark.parametrize('make, args', [
    (lambda: layers.RelativePositionBias(num_heads=2, dtype='bfloat16'), (300, 300)),
    (lambda: layers.Embed(num_embeddings=4, features=2, dtype='bfloat16'),
     (jnp.zeros((1, 300), jnp.int32),)),
    (lambda: layers.PositionEmbed(num_embeddings=4, features=2, dtype='bfloat16'),
     (jnp.zeros((1, 300), jnp.int32),)),
])
def test_bfloat16_lookups_accumulate_their_gradient_in_the_param_dtype(make, args):
  """A bfloat16 lookup of a float32 table returns bfloat16, but the gradient's
  scatter-add runs in float32: summing 300 ones in bfloat16 stops at 256."""
  module = make()
  params = nn.unbox(module.init(KEY, *args))['params']
  out = module.apply({'params': params}, *args)
  assert out.dtype == jnp.bfloat16
  grad = jax.grad(lambda p: module.apply({'params': p}, *args).astype(jnp.float32).sum())(params)
  table = jax.tree_util.tree_leaves(grad)[0]
  assert table.dtype == jnp.float32
  if isinstance(module, layers.RelativePositionBias):
    buckets = module.bucket(np.arange(300)[None, :] - np.arange(300)[:, None],
                            module.bidirectional, module.num_buckets, module.max_distance)
    want = np.broadcast_to(np.bincount(buckets.ravel(), minlength=module.num_buckets), table.shape)
  else:  # 300 lookups of id 0, each adding a cotangent of ones
    want = np.zeros(table.shape, np.float32)
    want[0] = 300
  np.testing.assert_array_equal(table, want)


def attention_setup(num_heads=2, head_dim=4, dim=8, length=5):
  attn = layers.Attention(num_heads=num_heads, head_dim=head_dim)
  x = jax.random.normal(jax.random.key(1), (2, length, dim))
  variables = attn.init(KEY, x, x)
  return attn, nn.unbox(variables), x


def test_attention_matches_manual_computation():
  attn, params, x = attention_setup()
  p = jax.tree_util.tree_map(np.asarray, params['params'])
  assert p['query']['kernel'].shape == (8, 8)
  assert p['out']['kernel'].shape == (8, 8)
  q = (x @ p['query']['kernel']).reshape(2, 5, 2, 4)
  k = (x @ p['key']['kernel']).reshape(2, 5, 2, 4)
  v = (x @ p['value']['kernel']).reshape(2, 5, 2, 4)
  logits = np.einsum('btnh,bsnh->bnts', q, k)  # no 1/sqrt(h) scaling
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  want = np.einsum('bnts,bsnh->btnh', w, v).reshape(2, 5, 8) @ p['out']['kernel']
  np.testing.assert_allclose(attn.apply(params, x, x), want, rtol=1e-4,
                             atol=1e-5)


def test_attention_masked_keys_do_not_matter():
  attn, params, x = attention_setup()
  valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  mask = layers.make_attention_mask(valid, valid)
  y1 = attn.apply(params, x, x, mask)
  x2 = x.at[0, 3:].set(100.0)
  y2 = attn.apply(params, x2, x2, mask)
  np.testing.assert_allclose(y1[0, :3], y2[0, :3], rtol=1e-5, atol=1e-6)


def test_attention_initialisers_fold_depth_scaling_into_query():
  attn = layers.Attention(num_heads=8, head_dim=64)
  x = jnp.ones((1, 2, 512))
  p = nn.unbox(attn.init(KEY, x, x))['params']
  std = {k: float(np.std(p[k]['kernel'])) for k in p}
  np.testing.assert_allclose(std['key'] * np.sqrt(512), 1.0, rtol=0.05)
  np.testing.assert_allclose(std['value'] * np.sqrt(512), 1.0, rtol=0.05)
  np.testing.assert_allclose(std['query'] * np.sqrt(512 * 64), 1.0, rtol=0.05)
  np.testing.assert_allclose(std['out'] * np.sqrt(512), 1.0, rtol=0.05)


def test_attention_dropout_needs_rng_and_changes_output():
  attn = layers.Attention(num_heads=2, head_dim=4, dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  params = nn.unbox(attn.init(KEY, x, x))
  y_det = attn.apply(params, x, x)
  y_drop = attn.apply(params, x, x, deterministic=False,
                      rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(y_det, y_drop)
  with pytest.raises(Exception):
    attn.apply(params, x, x, deterministic=False)


def test_gated_mlp_is_gelu_times_linear():
  mlp = layers.GatedMlp(mlp_dim=16)
  x = jax.random.normal(jax.random.key(2), (2, 3, 8))
  variables, y = init_apply(mlp, x)
  p = nn.unbox(variables)['params']
  assert sorted(p) == ['wi_0', 'wi_1', 'wo']
  h = nn.gelu(x @ p['wi_0']['kernel']) * (x @ p['wi_1']['kernel'])
  np.testing.assert_allclose(y, h @ p['wo']['kernel'], rtol=1e-5, atol=1e-6)
  single = layers.GatedMlp(mlp_dim=16, activations=('relu',))
  assert sorted(single.init(KEY, x)['params']) == ['wi', 'wo']


def test_decoder_mask_uses_targets_so_bos_zero_is_visible():
  # decoder inputs [0, 5, 6, 0]; targets [5, 6, 1, 0] (EOS=1, then padding).
  targets = jnp.array([[5, 6, 1, 0]])
  mask = np.asarray(layers.make_decoder_mask(targets))[0, 0]
  want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]],
                  bool)
  np.testing.assert_array_equal(mask, want)


def test_decoder_mask_segments_and_prefix():
  targets = jnp.array([[6, 7, 8, 3, 4, 5, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
  causal_attention = jnp.array([[1, 1, 0, 1, 1, 0, 0]])
  mask = np.asarray(layers.make_decoder_mask(targets, causal_attention,
                                             segments))[0, 0]
  assert mask[0, 1]  # prefix is bidirectional
  assert not mask[1, 2]  # but cannot see the target part
  assert not mask[3, 2] and not mask[2, 3]  # no cross-segment attention
  assert mask[5, 3] and mask[4, 3] and mask[3, 4]
  assert not mask[6].any()


def test_attention_mask_cross_segments_and_keys_only():
  dec_valid = jnp.array([[1, 1, 0]], bool)
  enc_valid = jnp.array([[1, 1, 1, 0]], bool)
  mask = np.asarray(layers.make_attention_mask(
      dec_valid, enc_valid, query_segment_ids=jnp.array([[1, 2, 0]]),
      key_segment_ids=jnp.array([[1, 1, 2, 0]])))
  assert mask.shape == (1, 1, 3, 4)
  np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
  keys_only = np.asarray(layers.make_attention_mask(None, enc_valid))
  assert keys_only.shape == (1, 1, 1, 4)
  np.testing.assert_array_equal(keys_only[0, 0, 0], [1, 1, 1, 0])


def test_attention_mask_over_decoding_cache_slots():
  # Queries at positions 1 and 3 over 5 slots; the prompt (prefix) is 2 slots.
  slots = jnp.arange(5)[None]
  positions = jnp.array([[1, 3]])
  mask = np.asarray(layers.make_attention_mask(
      None, None, causal=True, query_positions=positions, key_positions=slots))
  np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
  prefix = np.asarray(layers.make_attention_mask(
      None, None, causal=True, query_positions=jnp.array([[0]]), key_positions=slots,
      key_prefix=slots < 3))
  np.testing.assert_array_equal(prefix[0, 0], [[1, 1, 1, 0, 0]])
