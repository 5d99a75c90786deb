"""The Llama family (Llama, Mistral, Qwen2) against Hugging Face's models, same weights.

Random small HF models are built here (no downloads); logits, losses and greedy
generation are compared, and the published configs' parameter counts checked.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from flax import linen as nn
from t5x_lite import hf as t5x_lite_hf
from t5x_lite import rotary
from t5x_lite.hf import llama as hf_llama
from t5x_lite.models import llama

from conftest import require

torch = require('torch')
transformers = require('transformers')

ROPE_SCALING = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
LENGTH = 24

# HF config fields of every random model, then each case's own (HF names).
HF_SMALL = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=8,
                intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, initializer_range=0.2, attn_implementation='eager',
                bos_token_id=0, eos_token_id=0, pad_token_id=0)
# The same as our config fields.
SMALL = dict(vocab_size=97, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48, num_layers=2,
             max_positions=64, initializer_range=0.2)
# name: (HF config class name, HF fields, our config fields they give).
CASES = {
    'llama_gqa2_rope_scaling': ('LlamaConfig', dict(
        num_key_value_heads=2, rope_parameters=dict(ROPE_SCALING, rope_theta=500000.0)),
        dict(num_kv_heads=2, rope_theta=500000.0, rope_scaling=ROPE_SCALING)),
    'llama_mha_tied': ('LlamaConfig', dict(num_key_value_heads=4, tie_word_embeddings=True),
                       dict(num_kv_heads=4, tie_word_embeddings=True)),
    'mistral_gqa4_window': ('MistralConfig', dict(num_key_value_heads=1, sliding_window=5),
                            dict(num_kv_heads=1, sliding_window=5)),
    'qwen2_gqa2_bias_tied': ('Qwen2Config', dict(
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1e6}),
        dict(num_kv_heads=2, tie_word_embeddings=True, rope_theta=1e6, qkv_bias=True)),
}


def hf_model(name: str, seed: int = 0):
  """Case `name`'s random HF *ForCausalLM (eager attention, float32)."""
  config_cls, fields, _ = CASES[name]
  config = getattr(transformers, config_cls)(**{**HF_SMALL, **fields})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # non-trivial norms and biases (HF inits them 1 / 0)
    for param_name, p in model.named_parameters():
      if param_name.endswith('bias') or 'norm' in param_name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def right_padded(vocab, rng, lengths=(LENGTH, 15, 6)):
  ids = rng.integers(1, vocab, (len(lengths), LENGTH))
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    mask[i, :n] = 1
  ids[1, 3] = 0  # id 0 as a real token inside a row
  return np.where(mask > 0, ids, 0).astype(np.int32), mask.astype(np.int32)


def lm_batch(ids, mask):
  """Our LM features for next-token prediction on HF-style ids."""
  return dict(decoder_input_tokens=ids, decoder_target_tokens=np.pad(ids[:, 1:], ((0, 0), (0, 1))),
              decoder_loss_weights=np.pad(mask[:, 1:], ((0, 0), (0, 1))),
              decoder_attention_mask=mask)


def hf_logits(hf, ids, mask):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(mask).long()).logits.numpy()


@pytest.fixture(scope='module', params=sorted(CASES))
def loaded(request, tmp_path_factory):
  """(case name, HF model, our model, our params) through `hf.load`."""
  hf = hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  model, params = t5x_lite_hf.load(str(path))
  return request.param, hf, model, params


def test_logits_match_hf(loaded, kernels):
  name, hf, model, params = loaded
  assert isinstance(model, llama.LlamaModel)
  assert model.config == llama.LlamaConfig(**SMALL, **CASES[name][2])
  ids, mask = right_padded(model.config.vocab_size, np.random.default_rng(0))
  ours = np.asarray(jax.jit(model.logits)(params, lm_batch(ids, mask)))
  theirs = hf_logits(hf, ids, mask)
  valid = mask > 0
  assert np.abs(theirs[valid]).max() > 1.0  # the comparison is not trivial
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)
  if model.config.sliding_window:  # the window matters here: without it logits differ
    wide = llama.LlamaModel(dataclasses.replace(model.config, sliding_window=None))
    assert not np.allclose(np.asarray(jax.jit(wide.logits)(params, lm_batch(ids, mask)))[valid],
                           theirs[valid], atol=1e-2)
