"""Decoding speed on a tiny T5: KV-cached against uncached, greedy and beam.

    python -m t5x_lite.decode_bench [--batch_size 8] [--input_length 128] [--max_decode_len 32]

Prints decoded tokens per second (rows x steps / s) for greedy and beam-4
search, each with the KV cache and without it (the decoder reruns over every
token so far), with random weights and EOS unreachable so that every run takes
max_decode_len steps.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse  # pylint: disable=g-import-not-at-top
import functools  # pylint: disable=g-import-not-at-top
import time  # pylint: disable=g-import-not-at-top
from typing import Optional, Sequence  # pylint: disable=g-import-not-at-top

from flax import linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from t5x_lite import decoding  # pylint: disable=g-import-not-at-top
from t5x_lite.models import encoder_decoder  # pylint: disable=g-import-not-at-top


def _uncached_t5_step(model, params, encoded, encoder_tokens, length: int):
  """A T5 step function without a KV cache: the decoder reruns on the whole
  [B, length] buffer of tokens so far (a baseline for the benchmark)."""
  size = encoder_tokens.shape[0]
  cache = {'encoded': encoded, 'encoder_tokens': encoder_tokens,
           'buffer': jnp.zeros((size, length), jnp.int32)}

  def tokens_to_logits(tokens, cache, step):
    buffer = jax.lax.dynamic_update_slice(cache['buffer'], tokens, (0, step))
    logits = model.module.apply(
        {'params': params}, cache['encoded'], cache['encoder_tokens'], buffer,
        jnp.ones_like(buffer), method='decode')
    return (jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False),
            dict(cache, buffer=buffer))

  return tokens_to_logits, cache


def benchmark(batch_size: int = 8, input_length: int = 128,
              max_decode_len: int = 32, num_beams: int = 4,
              repeats: int = 3) -> dict:
  """Decoded tokens per second (rows x steps / s) on the tiny T5 (the sizes
  of configs/models/t5_1_1_tiny.gin, random weights), for greedy and beam
  search, with and without the KV cache; EOS unreachable so that every run
  takes max_decode_len steps."""
  cfg = encoder_decoder.T5Config(
      vocab_size=8192, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=512,
      num_encoder_layers=2, num_decoder_layers=2)
  model = encoder_decoder.EncoderDecoderModel(cfg)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), model.dummy_batch(batch_size, input_length,
                                           max_decode_len)))['params']
  enc = jax.random.randint(jax.random.key(1), (batch_size, input_length), 2,
                           cfg.vocab_size)
  eos = cfg.vocab_size  # never generated
  searches = {
      'greedy': functools.partial(decoding.greedy_search,
                                  max_decode_len=max_decode_len, eos_id=eos),
      f'beam{num_beams}': functools.partial(
          decoding.beam_search, max_decode_len=max_decode_len,
          num_beams=num_beams, eos_id=eos),
  }

  def cached(search):
    return lambda p, b: model.decode(
        p, b, method='greedy' if search == 'greedy' else 'beam',
        max_decode_length=max_decode_len, num_beams=num_beams, eos_id=eos)

  def uncached(search):
    def run(p, b):
      encoded = model.module.apply({'params': p}, b['encoder_input_tokens'],
                                   method='encode')
      step, cache = _uncached_t5_step(model, p, encoded,
                                      b['encoder_input_tokens'], max_decode_len)
      start = jnp.zeros((batch_size,), jnp.int32)
      return searches[search](step, start, cache)
    return run

  results = {}
  for search in searches:
    for kind, make in (('cached', cached), ('uncached', uncached)):
      fn = jax.jit(make(search))
      out = jax.block_until_ready(fn(params, {'encoder_input_tokens': enc}))
      begin = time.perf_counter()
      for _ in range(repeats):
        out = jax.block_until_ready(fn(params, {'encoder_input_tokens': enc}))
      seconds = (time.perf_counter() - begin) / repeats
      results[f'{search} {kind}'] = batch_size * int(out.num_steps) / seconds
  return results


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--input_length', type=int, default=128)
  parser.add_argument('--max_decode_len', type=int, default=32)
  args = parser.parse_args(argv)
  results = benchmark(batch_size=args.batch_size, input_length=args.input_length,
                      max_decode_len=args.max_decode_len)
  print(f'{jax.devices()[0].platform}: tokens/s (rows x steps / s)')
  for name, speed in results.items():
    print(f'  {name:16s} {speed:12.1f}')


if __name__ == '__main__':
  main()
