"""Our KV-cached generation against Hugging Face's `generate`, same weights."""

import jax
import numpy as np

from flax import linen as nn
from t5x_lite import hf as t5x_lite_hf
from t5x_lite.models import encoder_decoder as ed

import test_bart_hf_parity as bart_parity
import test_gpt2_hf_parity as gpt2_parity
import test_t5_hf_parity as t5_parity

import families
from conftest import require

torch = require('torch')
transformers = require('transformers')

STEPS = 10


def _no_eos(hf):
  """HF generation without EOS (ours gets an unreachable eos_id): fixed length."""
  config = hf.generation_config
  config.eos_token_id = None
  config.forced_eos_token_id = None
  config.forced_bos_token_id = None
  config.pad_token_id = 0
  return hf


def _log_prob(hf_logits: np.ndarray, tokens: np.ndarray) -> float:
  logits = torch.from_numpy(hf_logits)
  return float(torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(tokens)[:, None]).sum())


def test_gpt2_greedy_and_beam_match_hf_generate(tmp_path):
  cfg = gpt2_parity.SMALL
  hf = _no_eos(gpt2_parity.random_hf_model(cfg, seed=3))
  hf.save_pretrained(tmp_path)
  model, params = t5x_lite_hf.load(tmp_path)
  rng = np.random.default_rng(0)
  lengths = [5, 2, 7]
  buffer = np.zeros((3, 8), np.int32)  # BOS (0), then the prompt, then 0s
  for i, n in enumerate(lengths):
    buffer[i, 1:n + 1] = rng.integers(1, cfg.vocab_size, n)
  batch = {'decoder_input_tokens': buffer, 'decoder_prompt_lengths': np.array(lengths)}
  eos = cfg.vocab_size  # never generated
  greedy, greedy_scores = model.predict_batch(params, batch, max_decode_length=STEPS, eos_id=eos)
  beam, _ = model.predict_batch(params, batch, method='beam', num_beams=4, alpha=0.0,
                                max_decode_length=STEPS, eos_id=eos)
  for i, n in enumerate(lengths):
    prompt = torch.from_numpy(buffer[i:i + 1, :n + 1]).long()
    mask = torch.ones_like(prompt)  # id 0 (our BOS) is a real token here
    with torch.no_grad():
      theirs = hf.generate(prompt, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                           num_beams=1)
      theirs_beam = hf.generate(prompt, attention_mask=mask, max_new_tokens=STEPS,
                                do_sample=False, num_beams=4, length_penalty=0.0,
                                early_stopping=False)
      logits = hf(theirs).logits[0, n:-1].numpy()
    new = theirs[0, n + 1:].numpy()
    np.testing.assert_array_equal(np.asarray(greedy[i]), new)
    np.testing.assert_array_equal(np.asarray(beam[i]), theirs_beam[0, n + 1:].numpy())
    np.testing.assert_allclose(float(greedy_scores[i]), _log_prob(logits, new), rtol=1e-4)
  assert len({tuple(np.asarray(r)) for r in greedy}) == 3  # rows really differ


def test_bart_greedy_matches_hf_generate(tmp_path):
  hf = _no_eos(bart_parity.random_hf_model(seed=4))
  hf.save_pretrained(tmp_path)
  model, params = t5x_lite_hf.load(tmp_path)
  assert model.config.decoder_start_id == hf.config.decoder_start_token_id == 2
  rng = np.random.default_rng(1)
  enc = rng.integers(3, 97, (3, 12)).astype(np.int32)
  enc[1, 7:] = bart_parity.HF_PAD
  enc[2, 3:] = bart_parity.HF_PAD
  ours, _ = model.predict_batch(params, {'encoder_input_tokens': enc},
                                max_decode_length=STEPS, eos_id=97)
  with torch.no_grad():
    theirs = hf.generate(torch.from_numpy(enc).long(),
                         attention_mask=torch.from_numpy(enc != bart_parity.HF_PAD).long(),
                         max_new_tokens=STEPS, do_sample=False, num_beams=1)
  np.testing.assert_array_equal(np.asarray(ours), theirs[:, 1:].numpy())  # after the start token


def test_t5_greedy_and_beam_match_hf_generate():
  """Few relative position buckets, so decode positions reach the log-spaced range."""
  # Equal stack depths: HF's generation cache assumes them.
  cfg = families.config('t5', emb_dim=32, num_heads=4, mlp_dim=48,
                        relative_attention_num_buckets=12, relative_attention_max_distance=20,
                        logits_via_embedding=True)
  model = ed.EncoderDecoderModel(cfg)
  batch = model.dummy_batch(3, 12, STEPS)
  params = nn.unbox(model.init(jax.random.key(5), batch))['params']
  params = jax.tree_util.tree_map(lambda x: x * 4, params)  # logits far from flat
  hf = _no_eos(t5_parity.build_hf(params, cfg))
  rng = np.random.default_rng(2)
  enc = rng.integers(2, cfg.vocab_size, (3, 12)).astype(np.int32)
  enc[1, 8:] = 0
  enc[2, 4:] = 0
  eos = cfg.vocab_size
  inputs = {'encoder_input_tokens': enc}
  greedy, _ = model.predict_batch(params, inputs, max_decode_length=STEPS, eos_id=eos)
  beam, _ = model.predict_batch(params, inputs, method='beam', num_beams=4, alpha=0.0,
                                max_decode_length=STEPS, eos_id=eos)
  ids, mask = torch.from_numpy(enc).long(), torch.from_numpy(enc > 0).long()
  with torch.no_grad():
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                         num_beams=1)
    theirs_beam = hf.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                              num_beams=4, length_penalty=0.0, early_stopping=False)
  np.testing.assert_array_equal(np.asarray(greedy), theirs[:, 1:].numpy())
  np.testing.assert_array_equal(np.asarray(beam), theirs_beam[:, 1:].numpy())
