"""Cached decoding (greedy, sampling, beam search) for T5, GPT and BART,
checked against uncached teacher-forced references and hand-built cases."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import linen as nn

from t5x_lite import decoding
from t5x_lite import param_layout
from t5x_lite.errors import UserError
from t5x_lite.models import bart
from t5x_lite.models import decoder
from t5x_lite.models import encoder_decoder as ed

V = 64
L = 10  # max decode length
EOS = 1
T5 = ed.T5Config(vocab_size=V, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                 num_encoder_layers=2, num_decoder_layers=2)
GPT = decoder.GPTConfig(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8,
                        mlp_dim=64, num_layers=2, max_positions=32,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
BART = bart.BartConfig(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8,
                       mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2,
                       max_positions=40, dropout_rate=0.0)
PROMPTS = [[7, 8, 9, 10, 11], [12, 13], [20, 21, 22], []]


def encoder_inputs(seed=7, size=4, length=8):
  tokens = np.array(jax.random.randint(jax.random.key(seed), (size, length), 2, V))
  tokens[1, 5:] = 0
  tokens[3, 3:] = 0
  return tokens


@functools.lru_cache(maxsize=None)
def setup(family: str, scan: bool = False):
  """(model, params in the config's layout), initialised once per family."""
  cfg = {'t5': T5, 'gpt': GPT, 'bart': BART}[family]
  model_cls = {'t5': ed.EncoderDecoderModel, 'gpt': decoder.DecoderModel,
               'bart': bart.BartModel}[family]
  model = model_cls(cfg)
  dummy = (model.dummy_batch(2, 8) if family == 'gpt' else
           model.dummy_batch(2, 8, 8))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy))
  rng = np.random.default_rng(0)

  def fill(path, x):  # norm scales near 1, the rest N(0, 0.2^2): peaked logits
    noise = rng.standard_normal(x.shape).astype(np.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray(1 + 0.1 * noise if is_scale else 0.2 * noise)

  params = jax.tree_util.tree_map_with_path(fill, shapes['params'])
  if scan:
    model = model_cls(dataclasses.replace(cfg, scan_layers=True))
    params = param_layout.stack_layers(params)
  return model, params


@functools.lru_cache(maxsize=None)
def decode_fn(family: str, scan: bool = False, **options):
  """Jitted `model.decode(params, batch, rng, eos_id)`, compiled once per
  family and static options (eos_id is traced, so it shares the compile)."""
  model, _ = setup(family, scan)

  def fn(params, batch, rng=None, eos_id=EOS):
    return model.decode(params, batch, rng, eos_id=eos_id,
                        max_decode_length=L, **options)
  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def logits_fn(family: str):
  model, _ = setup(family)
  return jax.jit(model.logits)


@functools.lru_cache(maxsize=None)
def _gpt_prompt_batch(length=12):
  """seqio.DecoderFeatureConverter rows of prefix-LM examples with empty
  targets, as T5X's DecoderOnlyModel.predict_batch gets them."""
  rows = [dict(inputs=p, targets=[]) for p in PROMPTS]
  ds = tf.data.Dataset.from_generator(
      lambda: iter(rows),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in rows[0]})
  half = length // 2
  out = seqio.DecoderFeatureConverter(pack=False)(
      ds, {'inputs': half, 'targets': length - half})
  batch = list(out.as_numpy_iterator())
  return {k: np.stack([ex[k] for ex in batch])
          for k in ('decoder_input_tokens', 'decoder_causal_attention')}


def gpt_prompt_batch():
  return {k: v.copy() for k, v in _gpt_prompt_batch().items()}


def greedy_reference(next_logits, size, eos):
  """Uncached greedy decoding: `next_logits(generated [B,i]) -> [B,V]` reruns
  the whole teacher-forced network on the growing sequence."""
  tokens = np.zeros((size, L), np.int32)
  scores = np.zeros(size)
  done = np.zeros(size, bool)
  for i in range(L):
    logits = np.asarray(next_logits(tokens[:, :i], i), np.float64)
    token = np.where(done, 0, logits.argmax(-1))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scores += np.where(done, 0.0, log_probs[np.arange(size), token])
    tokens[:, i] = token
    done |= token == eos
  return tokens, scores


def encdec_reference(family, enc, eos):
  _, params = setup(family)
  logits = logits_fn(family)
  size = enc.shape[0]

  def next_logits(generated, i):
    dec = np.zeros((size, L), np.int32)
    dec[:, 1:i + 1] = generated
    batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec,
                 decoder_target_tokens=np.ones_like(dec))
    return np.asarray(logits(params, batch))[:, i]

  return greedy_reference(next_logits, size, eos)


def gpt_reference(batch, causal_prompt: bool, eos):
  """Uncached GPT greedy: [BOS, prompt, generated] through the full network."""
  _, params = setup('gpt')
  logits_of = logits_fn('gpt')
  prompt = batch['decoder_input_tokens']
  size, width = prompt.shape
  ends = batch['decoder_causal_attention'].sum(1)  # BOS + prompt
  total = width + L

  def next_logits(generated, i):
    tokens = np.zeros((size, total), np.int32)
    feats = dict(decoder_input_tokens=tokens,
                 decoder_attention_mask=np.ones_like(tokens))
    if not causal_prompt:
      feats['decoder_causal_attention'] = np.zeros_like(tokens)
    for b in range(size):
      tokens[b, :ends[b]] = prompt[b, :ends[b]]
      tokens[b, ends[b]:ends[b] + i] = generated[b]
      if not causal_prompt:
        feats['decoder_causal_attention'][b, :ends[b]] = 1
    logits = np.asarray(logits_of(params, feats))
    return logits[np.arange(size), ends - 1 + i]

  return greedy_reference(next_logits, size, eos)


def reachable_eos(decode, params, batch):
  """An EOS id that ends row 0 early: its 4th token when no EOS is reachable."""
  return int(decode(params, batch, eos_id=V).tokens[0, 3])


def assert_same_decode(out, ref_tokens, ref_scores):
  np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
  np.testing.assert_allclose(np.asarray(out.scores), ref_scores, atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize('family', ['t5', 'bart'])
def test_cached_greedy_equals_uncached_encoder_decoder(family):
  _, params = setup(family)
  batch = {'encoder_input_tokens': encoder_inputs()}
  eos = reachable_eos(decode_fn(family), params, batch)
  out = decode_fn(family)(params, batch, eos_id=eos)
  ref_tokens, ref_scores = encdec_reference(family, batch['encoder_input_tokens'], eos)
  assert (ref_tokens[0, 4:] == 0).all() and (ref_tokens[1:, -1] != 0).any()
  assert_same_decode(out, ref_tokens, ref_scores)


def test_cached_greedy_equals_uncached_gpt_prefix_prompts():
  """Prompts of different lengths (and an empty one) in one batch."""
  _, params = setup('gpt')
  batch = gpt_prompt_batch()
  eos = reachable_eos(decode_fn('gpt'), params, batch)
  out = decode_fn('gpt')(params, batch, eos_id=eos)
  ref_tokens, ref_scores = gpt_reference(batch, False, eos)
  assert (ref_tokens[0, 4:] == 0).all() and (ref_tokens[1:, -1] != 0).any()
  assert_same_decode(out, ref_tokens, ref_scores)


def test_cached_greedy_equals_uncached_gpt_scanned_prompt_lengths():
  """Scanned layers; prompts given as decoder_prompt_lengths (causal)."""
  _, params = setup('gpt', scan=True)
  batch = gpt_prompt_batch()
  lengths = batch['decoder_causal_attention'].sum(1) - 1
  out = decode_fn('gpt', True)(
      params, dict(decoder_input_tokens=batch['decoder_input_tokens'],
                   decoder_prompt_lengths=lengths))
  assert_same_decode(out, *gpt_reference(batch, True, EOS))


def test_gpt_positions_must_fit():
  model, params = setup('gpt')
  batch = gpt_prompt_batch()  # 12 wide; 12 + 22 - 1 > 32 positions
  with pytest.raises(UserError, match='max_positions'):
    model.decode(params, batch, max_decode_length=22)


def test_beam_of_one_is_greedy():
  """No reachable EOS: every sequence ends at the length limit."""
  _, params = setup('t5')
  batch = {'encoder_input_tokens': encoder_inputs()}
  greedy = decode_fn('t5')(params, batch, eos_id=V)
  beam = decode_fn('t5', method='beam', num_beams=1, alpha=0.6)(
      params, batch, eos_id=V)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  # log_probs is the alpha=0 score.
  np.testing.assert_allclose(beam.log_probs, greedy.scores, rtol=1e-5)
  np.testing.assert_allclose(beam.scores, greedy.scores / ((5 + L) / 6) ** 0.6,
                             rtol=1e-5)


def test_beam_search_beats_greedy():
  _, params = setup('t5')
  batch = {'encoder_input_tokens': encoder_inputs()}
  greedy = np.asarray(decode_fn('t5')(params, batch).scores)
  beam = decode_fn('t5', method='beam', num_beams=4, alpha=0.0,
                   return_all_beams=True)(params, batch)
  assert beam.tokens.shape == (4, 4, L)
  best = np.asarray(beam.log_probs[:, 0])
  assert (best >= greedy - 1e-5).all()
  assert (best > greedy + 1e-3).any()  # the search found better sequences
  assert (np.diff(np.asarray(beam.scores), axis=1) <= 0).all()  # sorted
  # The best beam's score is its log-likelihood under the teacher-forced model.
  tokens = np.asarray(beam.tokens[:, 0])
  dec = np.concatenate([np.zeros((4, 1), np.int32), tokens[:, :-1]], axis=1)
  logits = np.asarray(logits_fn('t5')(params, dict(
      batch, decoder_input_tokens=dec, decoder_target_tokens=np.ones_like(dec))))
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  token_log_probs = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
  upto_eos = np.cumsum(np.cumsum(tokens == EOS, 1), 1) <= 1
  np.testing.assert_allclose((token_log_probs * upto_eos).sum(1), best,
                             rtol=1e-4, atol=1e-4)


def test_sampling():
  model, params = setup('t5')
  batch = {'encoder_input_tokens': encoder_inputs()}
  greedy = decode_fn('t5')(params, batch)
  top1 = decode_fn('t5', method='sample', top_k=1, temperature=3.0)(
      params, batch, jax.random.key(5))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.scores, greedy.scores, rtol=1e-5)
  sample = decode_fn('t5', method='sample', temperature=1.0)
  a = sample(params, batch, jax.random.key(1))
  b = sample(params, batch, jax.random.key(1))
  c = sample(params, batch, jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  with pytest.raises(UserError, match='rng'):
    model.decode(params, batch, method='sample')


def test_filter_logits_top_p_and_top_k():
  probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  filter_logits = jax.jit(decoding.filter_logits, static_argnames=('top_k', 'top_p'))
  for p, kept in [(0.8, {1, 3, 4}), (0.6, {1, 3}), (0.3, {1}), (0.9, {1, 2, 3, 4})]:
    # kept: the smallest set of most likely tokens with mass >= p.
    out = np.asarray(filter_logits(logits, top_p=p))
    assert set(np.flatnonzero(np.isfinite(out))) == kept, p
    filtered = np.asarray(jax.nn.softmax(out))
    expected = np.where(np.isin(np.arange(5), list(kept)), probs, 0)
    np.testing.assert_allclose(filtered, expected / expected.sum(), rtol=1e-5)
  out = np.asarray(filter_logits(logits, top_k=2))
  assert set(np.flatnonzero(np.isfinite(out))) == {1, 3}
  batched = filter_logits(jnp.stack([logits, logits[::-1]]), top_p=0.8)
  assert set(np.flatnonzero(np.isfinite(batched[1]))) == {0, 1, 3}


def test_length_penalty_hand_case():
  assert decoding.length_penalty(3, 0.6) == pytest.approx((8 / 6) ** 0.6)
  assert decoding.length_penalty(7, 0.0) == 1.0
  assert decoding.length_penalty(1, 1.0) == pytest.approx(1.0)


# A stub model: row b prefers token 3 + step (runner-up 40) until step
# stop[b], where it prefers EOS. The cache carries `stop` (beam search must
# repeat and reorder it) and counts the calls.
STOPS = np.array([2, 4, 0])


def stub_logits(tokens, cache, step):
  del tokens
  size = cache['stop'].shape[0]
  eos_now = step >= cache['stop']
  logits = jnp.zeros((size, V))
  logits = logits.at[:, 40].set(jnp.where(eos_now, 0.0, 20.0))
  logits = logits.at[:, 3 + step].set(jnp.where(eos_now, 0.0, 30.0))
  logits = logits.at[:, EOS].set(jnp.where(eos_now, 30.0, 0.0))
  return logits, dict(cache, calls=cache['calls'] + 1)


def stub_expected(alpha):
  """(tokens, log-probs, scores) of the preferred path, by hand."""
  tokens = np.zeros((3, L), np.int32)
  peak = 30.0 - np.log(np.exp(30.0) + np.exp(20.0) + V - 2)  # log p(preferred)
  eos = 30.0 - np.log(np.exp(30.0) + V - 1)
  log_probs = STOPS * peak + eos
  for b, stop in enumerate(STOPS):
    tokens[b, :stop] = 3 + np.arange(stop)
    tokens[b, stop] = EOS
  return tokens, log_probs, log_probs / ((5.0 + STOPS + 1) / 6.0) ** alpha


def test_eos_stops_rows_and_the_loop():
  cache = {'stop': jnp.asarray(STOPS), 'calls': jnp.int32(0)}
  tokens, log_probs, _ = stub_expected(0.0)
  start = jnp.zeros(3, jnp.int32)
  for out in (
      decoding.greedy_search(stub_logits, start, cache, max_decode_len=L),
      decoding.temperature_sample(stub_logits, start, cache, jax.random.key(0),
                                  max_decode_len=L, top_k=2, temperature=0.1)):
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.scores, log_probs, atol=1e-6)
    assert int(out.num_steps) == STOPS.max() + 1 < L


def test_beam_search_stub_eos_and_length_penalty():
  cache = {'stop': jnp.asarray(STOPS), 'calls': jnp.int32(0)}
  tokens, log_probs, scores = stub_expected(0.6)
  beam = jax.jit(functools.partial(
      decoding.beam_search, stub_logits, max_decode_len=L, num_beams=2,
      alpha=0.6, return_all_beams=True))
  out = beam(jnp.zeros(3, jnp.int32), cache)
  np.testing.assert_array_equal(out.tokens[:, 0], tokens)
  np.testing.assert_allclose(out.log_probs[:, 0], log_probs, atol=1e-6)
  np.testing.assert_allclose(out.scores[:, 0], scores, atol=1e-6)
  assert int(out.num_steps) == STOPS.max() + 1 < L  # exited early
  # The runner-up beam also ended in EOS (after one runner-up token).
  assert (np.asarray(out.tokens[:, 1]) == EOS).sum() == 3
