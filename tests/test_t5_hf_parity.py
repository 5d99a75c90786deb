"""Our T5.1.1 against Hugging Face's T5ForConditionalGeneration, same weights."""

import jax
import numpy as np
import pytest

from flax import linen as nn
from t5x_lite.hf import t5 as hf_t5
from t5x_lite.models import encoder_decoder as ed

import families
from conftest import require

torch = require('torch')
transformers = require('transformers')


def build_hf(params, cfg: ed.T5Config):
  hf_cfg = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim,
      d_ff=cfg.mlp_dim, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      dropout_rate=0.0, layer_norm_epsilon=1e-6,
      feed_forward_proj='gated-gelu',
      tie_word_embeddings=cfg.logits_via_embedding,
      decoder_start_token_id=0, pad_token_id=0)
  hf_cfg._attn_implementation = 'eager'
  model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  state = hf_t5.to_hf_state_dict(params, cfg)
  with torch.no_grad():
    if not cfg.logits_via_embedding:
      # Some transformers versions tie lm_head to `shared` unconditionally;
      # give it its own tensor, as T5.1.1 checkpoints have.
      model.lm_head.weight = torch.nn.Parameter(
          torch.from_numpy(state['lm_head.weight'].copy()))
    names = set()
    for name, param in model.named_parameters():
      param.copy_(torch.from_numpy(state[name].copy()))
      names.add(name)
  assert set(state) <= names | {'lm_head.weight'}, set(state) - names
  if not cfg.logits_via_embedding:
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  return model


def make_batch(rng, batch, in_len, tgt_len, vocab, in_lens, tgt_lens):
  enc = rng.integers(2, vocab, size=(batch, in_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, size=(batch, tgt_len)).astype(np.int32)
  for i in range(batch):
    enc[i, in_lens[i]:] = 0
    tgt[i, tgt_lens[i]:] = 0
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
              decoder_target_tokens=tgt,
              decoder_loss_weights=(tgt > 0).astype(np.int32))


CONFIGS = {
    'untied': families.config('t5', emb_dim=32, mlp_dim=64),
    # Few buckets and a short max distance exercise the log and clip ranges.
    'tied_small_buckets': families.config(
        't5', emb_dim=32, num_heads=4, mlp_dim=48, num_decoder_layers=3,
        relative_attention_num_buckets=12, relative_attention_max_distance=20,
        logits_via_embedding=True),
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_logits_and_loss_match_hf(name, kernels):
  cfg = CONFIGS[name]
  model = ed.EncoderDecoderModel(cfg, z_loss=0.0)
  batch = make_batch(np.random.default_rng(0), 3, 40, 36, cfg.vocab_size,
                     in_lens=[40, 23, 5], tgt_lens=[36, 17, 2])
  params = nn.unbox(model.init(jax.random.key(1), batch))['params']
  ours = np.asarray(model.logits(params, batch))
  loss, metrics = model.loss_fn(params, batch, None)

  hf = build_hf(params, cfg)
  labels = torch.from_numpy(batch['decoder_target_tokens']).long()
  labels[labels == 0] = -100
  with torch.no_grad():
    out = hf(
        input_ids=torch.from_numpy(batch['encoder_input_tokens']).long(),
        attention_mask=torch.from_numpy(batch['encoder_input_tokens'] > 0),
        decoder_input_ids=torch.from_numpy(
            batch['decoder_input_tokens']).long(),
        decoder_attention_mask=torch.from_numpy(
            batch['decoder_target_tokens'] > 0),
        labels=labels)
  theirs = out.logits.numpy()

  valid = batch['decoder_target_tokens'] > 0
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['cross_ent_loss']), float(out.loss),
                             rtol=1e-5)
