"""Our GPT decoder against Hugging Face's GPT2LMHeadModel, same weights."""

import dataclasses

import jax
import numpy as np
import pytest

from flax import linen as nn
from t5x_lite import hf as t5x_lite_hf
from t5x_lite.hf import gpt2 as hf_gpt2
from t5x_lite.models import decoder as dec

import families
from conftest import require

torch = require('torch')
transformers = require('transformers')

SMALL = families.config('gpt', vocab_size=97, emb_dim=32, num_heads=4, mlp_dim=48,
                        max_positions=40)


def hf_config(cfg: dec.GPTConfig, **overrides):
  kwargs = dict(
      vocab_size=cfg.vocab_size, n_embd=cfg.emb_dim, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_positions,
      layer_norm_epsilon=cfg.layer_norm_eps, activation_function='gelu_new',
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=0, eos_token_id=0, attn_implementation='eager',
      initializer_range=0.2)  # 10x GPT-2's, so logits are not all near 0
  kwargs.update(overrides)
  return transformers.GPT2Config(**kwargs)


def random_hf_model(cfg: dec.GPTConfig, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(hf_config(cfg)).eval()
  with torch.no_grad():  # non-trivial norms and biases (HF inits them 1 / 0)
    for name, p in model.named_parameters():
      if name.endswith('bias') or '.ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def state_of(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def right_padded(cfg, rng, lengths=(40, 23, 6), length=40):
  """HF-style ids (0 is a real token here) and a 0/1 attention mask."""
  ids = rng.integers(0, cfg.vocab_size, (len(lengths), length))
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    mask[i, :n] = 1
  ids[1, 3] = 0  # id 0 as a real token inside a row
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  return ids, mask.astype(np.int32)


def lm_batch(ids, mask):
  """Our LM features for next-token prediction on HF-style ids."""
  targets = np.pad(ids[:, 1:], ((0, 0), (0, 1)))
  weights = np.pad(mask[:, 1:], ((0, 0), (0, 1)))
  return dict(decoder_input_tokens=ids, decoder_target_tokens=targets,
              decoder_loss_weights=weights, decoder_attention_mask=mask)


def hf_forward(hf, ids, mask, labels=None):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(mask).long(),
              labels=None if labels is None else
              torch.from_numpy(labels).long())


def test_gpt2_small_param_count_matches_hf():
  model = dec.DecoderModel(dec.GPT2_SMALL)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          model.dummy_batch(1, 8))
  ours = sum(int(np.prod(x.shape))
             for x in jax.tree_util.tree_leaves(nn.unbox(shapes)['params']))
  with torch.device('meta'):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
  # parameters() lists the tied lm_head / wte tensor once.
  assert ours == sum(p.numel() for p in hf.parameters()) == 124_439_808
  assert hf_gpt2.config_from_hf(transformers.GPT2Config().to_dict()) == (
      dec.GPT2_SMALL)


def test_logits_loss_and_causality_match_hf(tmp_path, kernels):
  """Through `hf.load` on a `save_pretrained` directory."""
  cfg = SMALL
  hf = random_hf_model(cfg)
  hf.save_pretrained(tmp_path)
  model, params = t5x_lite_hf.load(tmp_path)
  assert isinstance(model, dec.DecoderModel)
  assert model.config == dataclasses.replace(cfg, initializer_range=0.2)
  ids, mask = right_padded(cfg, np.random.default_rng(0))
  batch = lm_batch(ids, mask)

  ours = np.asarray(model.logits(params, batch))
  labels = np.where(mask > 0, ids, -100)
  out = hf_forward(hf, ids, mask, labels)
  theirs = out.logits.numpy()
  assert ours.shape == theirs.shape == (3, 40, cfg.vocab_size)
  valid = mask > 0
  assert np.abs(theirs[valid]).max() > 1.0  # the comparison is not trivial
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)
  scanned, stacked = t5x_lite_hf.load(tmp_path, scan_layers=True)
  assert stacked['decoder']['layers']['mlp']['wi']['kernel'].shape == (2, 32, cfg.mlp_dim)
  np.testing.assert_allclose(np.asarray(scanned.logits(stacked, batch)), ours, atol=1e-5)

  # HF shifts labels internally; our targets are pre-shifted.
  loss, metrics = model.loss_fn(params, batch, None)
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
  assert float(metrics['num_tokens']) == (40 - 1) + (23 - 1) + (6 - 1)

  # Causality: a later token changes nothing before it (ours and HF's).
  changed = ids.copy()
  changed[:, 5] = (changed[:, 5] + 1) % cfg.vocab_size
  ours2 = np.asarray(model.logits(params, lm_batch(changed, mask)))
  np.testing.assert_array_equal(ours2[:, :5], ours[:, :5])
  assert not np.allclose(ours2[0, 5:], ours[0, 5:])
  theirs2 = hf_forward(hf, changed, mask).logits.numpy()
  np.testing.assert_allclose(ours2[valid], theirs2[valid], atol=1e-4, rtol=0)


def test_gpt2model_state_dict_and_buffers_load():
  cfg = SMALL
  hf = random_hf_model(cfg, seed=1)
  full = hf_gpt2.from_hf_state_dict(state_of(hf), cfg)
  # GPT2Model names (no 'transformer.' prefix, no lm_head) plus old buffers.
  base = {k[len('transformer.'):]: v for k, v in state_of(hf).items()
          if k.startswith('transformer.')}
  base['h.0.attn.bias'] = np.tril(np.ones((1, 1, 40, 40), bool))
  base['h.0.attn.masked_bias'] = np.array(-1e4, np.float32)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         hf_gpt2.from_hf_state_dict(base, cfg), full)


def test_round_trip_to_hf_state_dict():
  cfg = SMALL
  model = dec.DecoderModel(cfg)
  params = nn.unbox(model.init(jax.random.key(3), model.dummy_batch(2, 8)))
  params = params['params']
  state = hf_gpt2.to_hf_state_dict(params, cfg)
  hf = transformers.GPT2LMHeadModel(hf_config(cfg)).eval()
  hf_names = set(hf.state_dict())
  assert set(state) == hf_names, set(state) ^ hf_names
  hf.load_state_dict({k: torch.from_numpy(np.array(v))
                      for k, v in state.items()})
  back = hf_gpt2.from_hf_state_dict(state_of(hf), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back,
                         jax.tree_util.tree_map(np.asarray, params))
  # And HF runs our weights to our logits.
  ids, mask = right_padded(cfg, np.random.default_rng(1))
  ours = np.asarray(model.logits(params, lm_batch(ids, mask)))
  theirs = hf_forward(hf, ids, mask).logits.numpy()
  np.testing.assert_allclose(ours[mask > 0], theirs[mask > 0], atol=1e-4,
                             rtol=0)


def test_config_from_hf_maps_and_rejects():
  base = hf_config(SMALL).to_dict()
  cfg = hf_gpt2.config_from_hf(dict(
      base, n_inner=None, activation_function='gelu', resid_pdrop=0.1,
      attn_pdrop=0.2))
  assert (cfg.mlp_dim, cfg.activation) == (4 * 32, 'gelu_exact')
  assert (cfg.dropout_rate, cfg.attention_dropout_rate) == (0.1, 0.2)
  assert hf_gpt2.config_from_hf(dict(base, activation_function='relu')
                                ).activation == 'relu'
  for key, value in (('scale_attn_by_inverse_layer_idx', True),
                     ('reorder_and_upcast_attn', True),
                     ('activation_function', 'swish')):
    with pytest.raises(ValueError, match=key):
      hf_gpt2.config_from_hf(dict(base, **{key: value}))


def test_mismatched_config_is_reported():
  state = state_of(random_hf_model(SMALL))
  wrong = dec.GPTConfig(**{**SMALL.__dict__, 'mlp_dim': 64})
  with pytest.raises(ValueError, match=r'h\.0\.mlp\.c_fc\.weight'):
    hf_gpt2.from_hf_state_dict(state, wrong)
  deeper = dec.GPTConfig(**{**SMALL.__dict__, 'num_layers': 3})
  with pytest.raises(KeyError, match=r'h\.2\.ln_1\.weight'):
    hf_gpt2.from_hf_state_dict(state, deeper)
  untied = dict(state, **{'lm_head.weight': state['lm_head.weight'] + 1})
  with pytest.raises(ValueError, match='lm_head.weight'):
    hf_gpt2.from_hf_state_dict(untied, SMALL)
