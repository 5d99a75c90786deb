"""Our BART against HF's BartForConditionalGeneration with the same weights."""

import dataclasses

import jax
import numpy as np
import pytest

from flax import linen as nn
from t5x_lite import hf as t5x_lite_hf
from t5x_lite.hf import bart as hf_bart
from t5x_lite.models import bart

from conftest import require

torch = require('torch')
transformers = require('transformers')

HF_PAD = 1  # HF BART's <pad>; <s> = 0 and </s> = 2 are ordinary ids here.


def hf_config(**overrides):
  kwargs = dict(
      vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2,
      encoder_attention_heads=4, decoder_attention_heads=4,
      encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
      activation_function='gelu', pad_token_id=HF_PAD,
      init_std=0.2,  # 10x BART's, so logits are not all near 0
      attn_implementation='eager')
  kwargs.update(overrides)
  return transformers.BartConfig(**kwargs)


def random_hf_model(seed: int = 0, **overrides):
  torch.manual_seed(seed)
  model = transformers.BartForConditionalGeneration(
      hf_config(**overrides)).eval()
  with torch.no_grad():  # non-trivial norms, biases and final_logits_bias
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'layer_norm' in name or 'layernorm' in name:
        p.add_(0.1 * torch.randn_like(p))
    model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
  return model


def to_numpy_state(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def our_config(model) -> bart.BartConfig:
  return hf_bart.config_from_hf(model.config.to_dict())


def padded_batch(cfg, rng, enc_lengths=(37, 20, 5), dec_lengths=(29, 11, 3),
                 enc_len=37, dec_len=29):
  """Right-padded with HF's pad id; real tokens avoid it."""
  b = len(enc_lengths)
  enc = rng.integers(2, cfg.vocab_size, (b, enc_len)).astype(np.int32)
  tgt = rng.integers(2, cfg.vocab_size, (b, dec_len)).astype(np.int32)
  dec_in = np.concatenate([np.full((b, 1), 2, np.int32), tgt[:, :-1]], axis=1)
  for i, (n, m) in enumerate(zip(enc_lengths, dec_lengths)):
    enc[i, n:] = HF_PAD
    tgt[i, m:] = HF_PAD
    dec_in[i, m:] = HF_PAD
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
              decoder_target_tokens=tgt,
              decoder_loss_weights=(tgt != HF_PAD).astype(np.int32))


def run_hf(model, batch):
  t = lambda x: torch.from_numpy(np.asarray(x)).long()
  labels = t(batch['decoder_target_tokens'])
  labels[t(batch['decoder_loss_weights']) == 0] = -100
  with torch.no_grad():
    return model(input_ids=t(batch['encoder_input_tokens']),
                 attention_mask=t(batch['encoder_input_tokens'] != HF_PAD),
                 decoder_input_ids=t(batch['decoder_input_tokens']),
                 decoder_attention_mask=t(batch['decoder_loss_weights']),
                 labels=labels)


@pytest.mark.parametrize('scale_embedding', [False, True])
def test_logits_and_loss_match_hf(scale_embedding, tmp_path, kernels):
  """Through `hf.load` on a `save_pretrained` directory."""
  hf = random_hf_model(seed=int(scale_embedding),
                       scale_embedding=scale_embedding)
  hf.save_pretrained(tmp_path)
  model, params = t5x_lite_hf.load(tmp_path)
  cfg = model.config
  assert isinstance(model, bart.BartModel)
  assert cfg.pad_id == HF_PAD and cfg.scale_embedding == scale_embedding
  assert cfg.activation == 'gelu_exact'
  assert (cfg.num_heads, cfg.head_dim) == (4, 8)
  batch = padded_batch(cfg, np.random.default_rng(0))

  ours = np.asarray(model.logits(params, batch))
  loss, metrics = model.loss_fn(params, batch, None)
  out = run_hf(hf, batch)
  theirs = out.logits.numpy()

  assert ours.shape == theirs.shape == (3, 29, cfg.vocab_size)
  real = batch['decoder_loss_weights'] > 0
  assert real.sum() == 29 + 11 + 3
  diff = np.abs(ours[real] - theirs[real]).max()
  assert diff < 1e-4, diff
  assert np.abs(theirs[real]).max() > 1.0  # the comparison is not trivial
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['num_tokens']), real.sum())


def test_packed_positions_restart_per_segment():
  """Each row's real example, placed after a filler segment with positions
  restarting at 0 (as packing does), gives the logits of the example alone."""
  hf = random_hf_model()
  cfg = our_config(hf)
  params = hf_bart.from_hf_state_dict(to_numpy_state(hf), cfg)
  model = bart.BartModel(cfg)
  alone = padded_batch(cfg, np.random.default_rng(0))
  packed = {k: np.full_like(v, 5) for k, v in alone.items()}
  for side, key, lengths in (('encoder', 'encoder_input_tokens', (37, 20, 5)),
                             ('decoder', 'decoder_target_tokens', (29, 11, 3))):
    seg = np.ones_like(packed[key])
    pos = np.zeros_like(packed[key])
    for row, n in enumerate(lengths):
      filler = seg.shape[1] - n
      seg[row, filler:] = 2
      pos[row, :filler] = np.arange(filler)
      pos[row, filler:] = np.arange(n)
      keys = [key] + (['decoder_input_tokens'] if side == 'decoder' else [])
      for k in keys:
        packed[k][row, filler:] = alone[k][row, :n]
    packed[f'{side}_segment_ids'] = seg
    packed[f'{side}_positions'] = pos
  ours = np.asarray(model.logits(params, packed))
  theirs = run_hf(hf, alone).logits.numpy()
  for row, n in enumerate((29, 11, 3)):
    assert np.abs(ours[row, 29 - n:] - theirs[row, :n]).max() < 1e-4


def test_round_trip_to_hf_state_dict():
  cfg = our_config(random_hf_model())
  model = bart.BartModel(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          model.dummy_batch(2, 8, 4))
  rng = np.random.default_rng(3)  # every value distinct, so no slot mixes up
  params = jax.tree_util.tree_map(
      lambda x: rng.standard_normal(x.shape).astype(np.float32),
      nn.unbox(shapes)['params'])
  state = hf_bart.to_hf_state_dict(params, cfg)
  hf = transformers.BartForConditionalGeneration(hf_config()).eval()
  assert set(state) == set(hf.state_dict())
  hf.load_state_dict({k: torch.from_numpy(np.array(v))
                      for k, v in state.items()})
  back = hf_bart.from_hf_state_dict(to_numpy_state(hf), cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # A BartModel state dict (no `model.` prefix, no head) loads too; it has
  # no final_logits_bias, which becomes zeros.
  base = {k[len('model.'):]: v for k, v in state.items()
          if k.startswith('model.')}
  plain = hf_bart.from_hf_state_dict(base, cfg)
  np.testing.assert_array_equal(plain['final_logits_bias'],
                                np.zeros(cfg.vocab_size))
  wo = lambda tree: tree['encoder']['layers_1']['mlp']['wo']['kernel']
  np.testing.assert_array_equal(wo(plain), wo(params))


def test_saved_checkpoint_without_tied_aliases(tmp_path):
  """save_pretrained keeps only model.shared.weight of the tied tensors."""
  safetensors_numpy = require('safetensors.numpy')
  hf = random_hf_model()
  hf.save_pretrained(tmp_path)
  saved = safetensors_numpy.load_file(str(tmp_path / 'model.safetensors'))
  assert 'lm_head.weight' not in saved and 'final_logits_bias' in saved
  cfg = our_config(hf)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         hf_bart.from_hf_state_dict(saved, cfg),
                         hf_bart.from_hf_state_dict(to_numpy_state(hf), cfg))


def count_ours(cfg: bart.BartConfig) -> int:
  model = bart.BartModel(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          model.dummy_batch(1, 8, 8))
  return sum(int(np.prod(x.shape))
             for x in jax.tree_util.tree_leaves(nn.unbox(shapes)['params']))


@pytest.mark.parametrize('size,hf_kwargs,hf_count', [
    ('base', dict(d_model=768, encoder_layers=6, decoder_layers=6,
                  encoder_attention_heads=12, decoder_attention_heads=12,
                  encoder_ffn_dim=3072, decoder_ffn_dim=3072), 139_420_416),
    ('large', {}, 406_291_456),  # HF's BartConfig() defaults are bart-large
])
def test_param_count_matches_hf(size, hf_kwargs, hf_count):
  with torch.device('meta'):
    hf = transformers.BartForConditionalGeneration(
        transformers.BartConfig(**hf_kwargs))
  # parameters() lists the tied shared / embed_tokens / lm_head tensor once;
  # final_logits_bias is a buffer in HF and a (trainable) param here.
  assert sum(p.numel() for p in hf.parameters()) == hf_count
  assert [n for n, _ in hf.named_buffers()] == ['final_logits_bias']
  assert count_ours(bart.SIZES[size]) == hf_count + bart.SIZES[size].vocab_size
  assert our_config(hf) == dataclasses.replace(
      bart.SIZES[size], pad_id=1, decoder_start_id=2, attention_dropout_rate=0.0,
      activation_dropout_rate=0.0)


def test_mismatched_state_or_config_is_reported():
  hf = random_hf_model()
  cfg = our_config(hf)
  state = to_numpy_state(hf)
  wrong = dataclasses.replace(cfg, mlp_dim=64)
  with pytest.raises(ValueError, match=r'encoder\.layers\.0\.fc1\.weight'):
    hf_bart.from_hf_state_dict(state, wrong)
  short = dataclasses.replace(cfg, max_positions=30)
  with pytest.raises(ValueError, match='embed_positions'):
    hf_bart.from_hf_state_dict(state, short)
  untied = dict(state, **{'lm_head.weight': state['lm_head.weight'] + 1})
  with pytest.raises(ValueError, match='lm_head.weight'):
    hf_bart.from_hf_state_dict(untied, cfg)
  del state['model.decoder.layers.1.encoder_attn_layer_norm.bias']
  with pytest.raises(KeyError, match=r'layers\.1\.encoder_attn_layer_norm'):
    hf_bart.from_hf_state_dict(state, cfg)


@pytest.mark.parametrize('key,value,match', [
    ('normalize_before', True, 'normalize_before'),
    ('add_final_layer_norm', True, 'add_final_layer_norm'),
    ('decoder_ffn_dim', 64, 'decoder_ffn_dim'),
    ('decoder_attention_heads', 2, 'decoder_attention_heads'),
    ('activation_function', 'swish', 'activation_function'),
    ('model_type', 'mbart', 'model_type'),
])
def test_unsupported_hf_config_is_rejected(key, value, match):
  config = dict(hf_config().to_dict(), **{key: value})
  with pytest.raises(ValueError, match=match):
    hf_bart.config_from_hf(config)
