"""The Llama family (Llama, Mistral, Qwen2) against Hugging Face's models, same weights.

Random small HF models are built here (no downloads); logits, losses and greedy
generation are compared, and the published configs' parameter counts checked.
Sharding of the key / value heads on 8 fake devices:
tests/multidevice/test_llama_kv_heads.py.
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
             max_positions=64, initializer_range=0.2, tie_word_embeddings=False)
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
  assert model.config == llama.LlamaConfig(**{**SMALL, **CASES[name][2]})
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


def _no_eos(hf):
  """HF generation without EOS (ours gets an unreachable eos_id): fixed length."""
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  return hf


# The cases generation and packing run on (the others' layers are the same code).
DECODE_CASES = ('llama_gqa2_rope_scaling', 'mistral_gqa4_window')


def test_greedy_generation_matches_hf_generate(loaded):
  """Prompts of mixed lengths in one batch, KV cache of num_kv_heads heads;
  Mistral's decodes run past its window of 5."""
  name, hf, model, params = loaded
  if name not in DECODE_CASES:
    pytest.skip('generation runs on DECODE_CASES')
  hf, steps = _no_eos(hf), 10
  rng = np.random.default_rng(1)
  lengths = [5, 2, 7]
  buffer = np.zeros((3, 8), np.int32)  # BOS (0), then the prompt, then 0s
  for i, n in enumerate(lengths):
    buffer[i, 1:n + 1] = rng.integers(1, model.config.vocab_size, n)
  batch = {'decoder_input_tokens': buffer, 'decoder_prompt_lengths': np.array(lengths)}
  predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=steps,
                                                     eos_id=model.config.vocab_size))
  ours, _ = predict(params, batch)
  cache = jax.eval_shape(lambda: model._prefill(params, batch, steps)[2])
  key = jax.tree_util.tree_leaves_with_path(cache)
  key = [x for path, x in key if 'cached_key' in jax.tree_util.keystr(path)][0]
  cfg = model.config
  assert math.prod(key.shape) == 3 * cfg.num_kv_heads * (8 + steps - 1) * cfg.head_dim
  for i, n in enumerate(lengths):
    prompt = torch.from_numpy(buffer[i:i + 1, :n + 1]).long()
    with torch.no_grad():
      theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                           do_sample=False, num_beams=1)
    np.testing.assert_array_equal(np.asarray(ours[i]), theirs[0, n + 1:].numpy())
  assert len({tuple(np.asarray(r)) for r in ours}) == 3  # rows really differ


def test_packed_segments_match_hf_on_each_alone(loaded):
  """Two examples packed in a row, positions restarting at the second: each
  gets the logits HF gives it alone (RoPE and the window see segment positions)."""
  name, hf, model, params = loaded
  if name not in DECODE_CASES:
    pytest.skip('packing runs on DECODE_CASES')
  rng = np.random.default_rng(2)
  a, b = rng.integers(1, model.config.vocab_size, 9), rng.integers(1, model.config.vocab_size, 11)
  tokens = np.zeros((1, LENGTH), np.int32)
  tokens[0, :20] = np.concatenate([a, b])
  segments = np.zeros_like(tokens)
  segments[0, :9], segments[0, 9:20] = 1, 2
  positions = np.zeros_like(tokens)
  positions[0, :9], positions[0, 9:20] = np.arange(9), np.arange(11)
  batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=tokens,
               decoder_segment_ids=segments, decoder_positions=positions)
  ours = np.asarray(jax.jit(model.logits)(params, batch))[0]
  for ids, part in ((a, ours[:9]), (b, ours[9:20])):
    theirs = hf_logits(hf, ids[None].astype(np.int32), np.ones((1, len(ids)), np.int32))[0]
    np.testing.assert_allclose(part, theirs, atol=1e-4, rtol=0)


def test_loss_scan_layers_and_state_dict_round_trip(loaded):
  """The loss HF computes; scanned layers; our params and config back to HF's."""
  name, hf, model, params = loaded
  ids, mask = right_padded(model.config.vocab_size, np.random.default_rng(3))
  batch = lm_batch(ids, mask)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
             labels=torch.from_numpy(np.where(mask > 0, ids, -100)).long())
  loss, _ = jax.jit(lambda p: model.loss_fn(p, batch, None))(params)
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
  # Scanned layers: the same function of the stacked params.
  scanned = llama.LlamaModel(dataclasses.replace(model.config, scan_layers=True))
  stacked = hf_llama.from_hf_state_dict(state_of(hf), scanned.config)
  if name in DECODE_CASES:
    valid = mask > 0
    np.testing.assert_allclose(np.asarray(jax.jit(scanned.logits)(stacked, batch))[valid],
                               out.logits.numpy()[valid], atol=1e-4, rtol=0)
  # Back to HF names and values (a tied head is written as the embedding).
  state = hf_llama.to_hf_state_dict(stacked, scanned.config)
  theirs = state_of(hf)
  assert set(state) == set(theirs), set(state) ^ set(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  # And the config: ours -> HF's config class -> ours.
  hf_config = hf_llama.config_to_hf(model.config)
  rebuilt = type(hf.config)(**{k: v for k, v in hf_config.items() if k != 'model_type'})
  assert hf_llama.config_from_hf(rebuilt.to_dict()) == model.config


def state_of(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_rope_frequencies_llama3_scaling_match_hf():
  """Our Llama 3 frequency scaling against HF's own rope init function."""
  from transformers import modeling_rope_utils
  config = transformers.LlamaConfig(**{**HF_SMALL, 'head_dim': 64, 'hidden_size': 256},
                                    rope_parameters=dict(ROPE_SCALING, rope_theta=500000.0))
  theirs, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS['llama3'](config, 'cpu')
  scaling = rotary.RopeScaling(**{k: v for k, v in ROPE_SCALING.items() if k != 'rope_type'})
  ours = rotary.rope_frequencies(64, 500000.0, scaling)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  plain = rotary.rope_frequencies(64, 500000.0)
  assert not np.allclose(ours, plain)  # the scaling changes the long wavelengths


# configs/models file: (published parameter count, HF config of the model).
PUBLISHED = {
    'llama3_2_1b': (1_235_814_400, 'LlamaConfig', dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 32.0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 8192})),
    'qwen2_5_0_5b': (494_032_768, 'Qwen2Config', dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, sliding_window=32768,
        use_sliding_window=False, max_window_layers=21,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0})),
    'mistral_7b': (7_241_732_096, 'MistralConfig', dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=32768, sliding_window=4096,
        rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_configs_param_counts(name):
  """configs/models/<name>.gin: the published count, counted from abstract
  shapes (ours) and on the meta device (HF's), and the shape HF's config gives."""
  import gin
  from t5x_lite import gin_utils
  count, config_cls, fields = PUBLISHED[name]
  gin.clear_config()
  try:
    gin_utils.parse_gin([f'configs/models/{name}.gin'], [])
    model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_batch(1, 8))
  ours = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)['params']))
  hf_config = getattr(transformers, config_cls)(**fields)
  with torch.device('meta'):
    theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(
        hf_config).parameters())
  assert ours == theirs == count
  expected = dataclasses.replace(hf_llama.config_from_hf(hf_config.to_dict()),
                                 **{k: getattr(model.config, k) for k in (
                                     'dtype', 'param_dtype', 'scan_layers')})
  assert model.config == expected



def test_sliding_window_mask_by_hand():
  """Window 2: each query sees itself and the one position before it."""
  from t5x_lite import layers
  positions = np.arange(4)[None]
  mask = layers.make_attention_mask(None, None, causal=True, query_positions=positions,
                                    key_positions=positions, sliding_window=2)
  expected = [[1, 0, 0, 0],
              [1, 1, 0, 0],
              [0, 1, 1, 0],
              [0, 0, 1, 1]]
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], np.array(expected, bool))


def test_prefix_lm_attention_and_decoding():
  """Bidirectional over the prefix, causal after it; a prefix-LM prompt
  decodes (KV cache) to the argmax of the teacher-forced logits."""
  cfg = llama.LlamaConfig(**{**SMALL, 'num_kv_heads': 2})
  model = llama.LlamaModel(cfg)
  ids = np.random.default_rng(4).integers(1, cfg.vocab_size, (1, 10)).astype(np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), {'decoder_input_tokens': ids,
                                                   'decoder_target_tokens': ids}))['params']
  params = jax.tree_util.tree_map(lambda x: x * 3, params)  # logits far from flat
  prefix = np.zeros_like(ids)
  prefix[0, :5] = 1  # BOS and 4 prompt tokens
  ids[0, 0] = 0
  logits = jax.jit(model.logits)

  def changed(position, causal_attention):
    other = ids.copy()
    other[0, position] = other[0, position] % (cfg.vocab_size - 1) + 1
    batch = dict(decoder_input_tokens=ids, decoder_target_tokens=np.ones_like(ids))
    if causal_attention is not None:
      batch['decoder_causal_attention'] = causal_attention
    before = np.asarray(logits(params, batch))
    after = np.asarray(logits(params, dict(batch, decoder_input_tokens=other)))
    return (before != after).any(-1)[0]  # [L] positions that changed (masked keys add 0)

  np.testing.assert_array_equal(changed(3, prefix), [1] * 10)  # the prefix sees it both ways
  np.testing.assert_array_equal(changed(3, None), [0] * 3 + [1] * 7)  # causal: later only
  np.testing.assert_array_equal(changed(7, prefix), [0] * 7 + [1] * 3)

  steps = 5
  prompt = np.where(prefix > 0, ids, 0)
  predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=steps,
                                                     eos_id=cfg.vocab_size))
  tokens, _ = predict(params, {'decoder_input_tokens': prompt, 'decoder_causal_attention': prefix})
  full = np.concatenate([ids[:, :5], np.asarray(tokens)], axis=1)
  causal_attention = np.pad(prefix[:, :5], ((0, 0), (0, steps)))
  forced = np.asarray(logits(params, dict(decoder_input_tokens=full,
                                          decoder_target_tokens=np.ones_like(full),
                                          decoder_causal_attention=causal_attention)))
  np.testing.assert_array_equal(forced[0, 4:-1].argmax(-1), np.asarray(tokens)[0])


def test_gin_text_rebuilds_the_model():
  """`hf.gin_text` (what import_hf writes as model.gin) gives the same model,
  rope_scaling included."""
  import gin
  model = llama.LlamaModel(llama.LlamaConfig(**{**SMALL, **CASES['llama_gqa2_rope_scaling'][2]}))
  try:
    gin.parse_config(t5x_lite_hf.gin_text(model))
    rebuilt = gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert type(rebuilt) is llama.LlamaModel
  assert rebuilt.config == model.config
  assert isinstance(rebuilt.config.rope_scaling, rotary.RopeScaling)


def test_scanned_remat_gradients_and_dropout():
  """scan_layers + remat give the loop's loss and gradients; dropout (also on
  the grouped attention weights) changes the loss only when given an rng."""
  from t5x_lite import param_layout
  cfg = llama.LlamaConfig(**{**SMALL, 'num_kv_heads': 2, 'dropout_rate': 0.1,
                             'attention_dropout_rate': 0.1})
  loop = llama.LlamaModel(cfg)
  scanned = llama.LlamaModel(dataclasses.replace(cfg, scan_layers=True, remat_policy='full'))
  ids, mask = right_padded(cfg.vocab_size, np.random.default_rng(5))
  batch = lm_batch(ids, mask)
  params = nn.unbox(jax.jit(loop.init)(jax.random.key(1), batch))['params']

  def grads(model, p):
    return jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0]))(p)

  loss, g = grads(loop, params)
  scanned_loss, scanned_g = grads(scanned, param_layout.stack_layers(params))
  np.testing.assert_allclose(float(scanned_loss), float(loss), rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         scanned_g, param_layout.stack_layers(g))
  dropped = jax.jit(lambda p: loop.loss_fn(p, batch, jax.random.key(2))[0])(params)
  assert np.isfinite(float(dropped)) and float(dropped) != float(loss)


def test_model_interface_and_dpo_wrapper():
  """The capabilities every decoder-only family declares; DPO over a Llama
  (policy = reference: loss log 2); scores per row."""
  from t5x_lite.models import base, preference
  model = llama.LlamaModel(llama.LlamaConfig(**{**SMALL, 'num_kv_heads': 2}))
  assert isinstance(model, base.BaseModel)
  assert model.DECODER_ONLY and model.GENERATES and model.max_length == 64
  ids, mask = right_padded(model.config.vocab_size, np.random.default_rng(6))
  batch = lm_batch(ids, mask)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  assert jax.jit(model.score)(params, batch).shape == (3,)
  dpo = preference.DPOModel(model)
  pairs = {f'{side}_{k}': v for side in ('chosen', 'rejected') for k, v in batch.items()}
  loss, _ = jax.jit(lambda p: dpo.loss_fn(p, pairs, None, frozen=dpo.frozen_state(p)))(params)
  assert float(loss) == pytest.approx(np.log(2), rel=1e-6)
