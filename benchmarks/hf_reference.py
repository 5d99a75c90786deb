"""The same model in Hugging Face transformers (PyTorch, CPU) against t5x_lite.

    python benchmarks/hf_reference.py --gin_file=gin/bench_t5_cpu.gin \
        [--mode=train,decode] [--steps=N] [--rounds=R] [--threads=T] [--gin.NAME=VALUE ...]

Needs the test extras (torch, transformers); the project itself does not.
A T5.1.1 (encoder-decoder) or GPT-2 (decoder) gin is rebuilt as a randomly
initialised HF model, saved, and read back through `t5x_lite.hf.load`, so both
frameworks run exactly the same weights.

mode train: R alternating rounds of N timed steps (after one warm-up) of
t5x_lite's train step (`t5x_lite.benchmark.benchmark_train`) and of HF's
(forward, loss, backward, `transformers.optimization.Adafactor` step; torch
on T threads, default all cores) on the gin task's real batches; medians.
Each framework's model FLOP/s is also given as a fraction of its own float32
2048^3 matmul (jax.jit / torch.mm) timed in the same rounds.
mode decode: greedy decoding of the task's first batch to the decoder length,
EOS unreachable in both (HF: `generate` with eos_token_id None and
min_new_tokens = max_new_tokens), median of 3 timed runs each; the tokens of
the two are compared.

Prints one readable line per measurement and, last, one JSON object.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import copy
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from t5x_lite import benchmark
from t5x_lite import gin_utils
from t5x_lite import hf
from t5x_lite import precompile
from t5x_lite.data import pipeline
from t5x_lite.errors import UserError


def hf_config(config):
  """The transformers config of one of our T5 / GPT configs."""
  if hasattr(config, 'num_encoder_layers'):
    gated = len(config.mlp_activations) == 2
    return transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj=('gated-' if gated else '') + config.mlp_activations[0],
        dropout_rate=0.0, tie_word_embeddings=config.logits_via_embedding,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  if hasattr(config, 'max_positions'):
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_embd=config.emb_dim, n_head=config.num_heads,
        n_layer=config.num_layers, n_inner=config.mlp_dim, n_positions=config.max_positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  raise UserError(f'{type(config).__name__} has no HF reference here; '
                  'use a T5.1.1 or GPT-2 gin.')


def same_weights(run, directory):
  """A random HF model of the gin's config, and our model + params read from its save."""
  torch.manual_seed(run.seed)
  cls = (transformers.T5ForConditionalGeneration if hasattr(run.model.config, 'num_encoder_layers')
         else transformers.GPT2LMHeadModel)
  model = cls(hf_config(run.model.config))
  model.save_pretrained(directory)
  overrides = {'scan_layers': run.model.config.scan_layers}
  ours, params = hf.load(directory, **overrides)
  return model, ours, jax.device_put(params)


def torch_batch(batch, encoder_decoder):
  """HF arguments of one of our batches (pads and packing ignored: same token count)."""
  t = lambda x: torch.from_numpy(np.asarray(x)).long()
  if encoder_decoder:
    labels = t(batch['decoder_target_tokens'])
    return {'input_ids': t(batch['encoder_input_tokens']),
            'labels': labels.masked_fill(labels == 0, -100)}
  return {'input_ids': t(batch['decoder_input_tokens']),
          'labels': t(batch['decoder_target_tokens'])}


def hf_train(model, batches, steps):
  """Seconds of each of `steps` HF train steps after one warm-up, on a copy of
  `model` (whose weights decode mode compares)."""
  model = copy.deepcopy(model).train()
  opt = transformers.optimization.Adafactor(model.parameters(), lr=1e-3, relative_step=False,
                                            scale_parameter=False, warmup_init=False)
  times = []
  for i in range(steps + 1):
    batch = batches[i % len(batches)]
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if i:
      times.append(time.perf_counter() - start)
  return times


def torch_matmul_roofline(size=benchmark.ROOFLINE_SIZE):
  """FLOP/s of a float32 size^3 torch matmul on torch's threads (median), the
  ceiling of HF's products as `benchmark.matmul_roofline` is of ours."""
  return benchmark.matmul_roofline(size, dot=torch.mm,
                                   operands=[torch.randn(size, size) for _ in range(2)])


def hf_greedy(model, batch, length, encoder_decoder, repeats=3):
  """(tokens [B, length], median seconds) of HF greedy `generate`."""
  model.eval()
  config = model.generation_config
  config.eos_token_id = config.forced_eos_token_id = None
  config.pad_token_id = 0
  if encoder_decoder:
    ids = torch.from_numpy(np.asarray(batch['encoder_input_tokens'])).long()
    kwargs = {'input_ids': ids, 'attention_mask': (ids > 0).long()}
  else:  # from BOS, as t5x_lite.benchmark decodes a decoder-only model
    kwargs = {'input_ids': torch.from_numpy(np.asarray(batch['decoder_input_tokens'])).long()}
  generate = lambda: model.generate(**kwargs, max_new_tokens=length, min_new_tokens=length,
                                    do_sample=False, num_beams=1)
  times = []
  with torch.no_grad():
    out = generate()
    for _ in range(repeats):
      start = time.perf_counter()
      generate()
      times.append(time.perf_counter() - start)
  return out[:, -length:].numpy(), statistics.median(times)


def main(argv):
  argv = list(argv)
  modes = (benchmark._pop_option(argv, 'mode') or 'train,decode').split(',')
  steps = benchmark._number(benchmark._pop_option(argv, 'steps'), 'steps', int, 10)
  rounds = benchmark._number(benchmark._pop_option(argv, 'rounds'), 'rounds', int, 1)
  threads = benchmark._number(benchmark._pop_option(argv, 'threads'), 'threads', int,
                              os.cpu_count())
  torch.set_num_threads(threads)
  gin_utils.parse_gin(*gin_utils.parse_flags(argv))
  args = precompile.train_arguments(jax.devices())
  run = benchmark.setup(args)
  encoder_decoder = hasattr(run.model.config, 'num_encoder_layers')
  iterator = iter(run.dataset)
  batches = [pipeline.next_numpy(iterator) for _ in range(4)]
  result = {'torch_threads': threads, 'torch': torch.__version__,
            'transformers': transformers.__version__}
  with tempfile.TemporaryDirectory() as directory:
    model, ours, params = same_weights(run, directory)
  if 'train' in modes:
    tokens = sum(v.size for k, v in batches[0].items() if k.endswith('input_tokens'))
    hf_batches = [torch_batch(b, encoder_decoder) for b in batches]
    ours_times, hf_times, rooflines, torch_rooflines = [], [], [], []
    for r in range(rounds):
      ours_result, _ = benchmark.benchmark_train(run, args['optimizer'], steps, input_seconds=0.1)
      ours_times.append(ours_result['seconds_per_step'])
      rooflines.append(ours_result['roofline_flops_per_second'])
      hf_times.append(statistics.median(hf_train(model, hf_batches, steps)))
      torch_rooflines.append(torch_matmul_roofline())
      print(f'round {r + 1}: t5x_lite {ours_times[-1]:.3f} s/step, HF {hf_times[-1]:.3f} s/step',
            flush=True)
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
    result.update(train_rounds=rounds, train_steps=steps, tokens_per_step=int(tokens),
                  ours_seconds_per_step=ours_s, hf_seconds_per_step=hf_s,
                  ours_tokens_per_second=tokens / ours_s, hf_tokens_per_second=tokens / hf_s,
                  train_speedup=hf_s / ours_s, ours_rounds=ours_times, hf_rounds=hf_times)
    # Each framework's model FLOP/s over its own matmul ceiling in the same sitting;
    # the step time a speedup S over HF needs is hf_s / S.
    flops = benchmark.model_flops_per_step(run.model.config, run.batch_shapes)
    roofline, torch_roofline = statistics.median(rooflines), statistics.median(torch_rooflines)
    ours_fraction, hf_fraction = flops / ours_s / roofline, flops / hf_s / torch_roofline
    result.update(model_flops_per_step=flops, roofline_flops_per_second=roofline,
                  torch_roofline_flops_per_second=torch_roofline,
                  ours_roofline_fraction=ours_fraction, hf_roofline_fraction=hf_fraction)
    print(f'train: t5x_lite {ours_s:.3f} s/step ({tokens / ours_s:,.0f} tokens/s), HF '
          f'{hf_s:.3f} s/step ({tokens / hf_s:,.0f} tokens/s): {hf_s / ours_s:.2f}x; '
          f'{100 * ours_fraction:.0f}% of the {roofline / 1e9:.0f} GFLOP/s JAX matmul roofline '
          f'against HF\'s {100 * hf_fraction:.0f}% of the {torch_roofline / 1e9:.0f} GFLOP/s '
          f'torch one; 1.2x HF would be {100 * 1.2 * flops / hf_s / roofline:.0f}% of ours')
  if 'decode' in modes:
    batch, length = benchmark.decode_batch(run)
    rows = next(iter(batch.values())).shape[0]
    theirs, hf_s = hf_greedy(model, batch, length, encoder_decoder)
    tokens, _, ours_s = benchmark.time_decode(ours, params, batch, length, {'method': 'greedy'})
    agree = float(np.mean(tokens == theirs))
    result.update(decode_rows=rows, decode_length=int(length),
                  ours_greedy_tokens_per_second=rows * length / ours_s,
                  hf_greedy_tokens_per_second=rows * length / hf_s,
                  decode_speedup=hf_s / ours_s, greedy_tokens_agree=agree)
    print(f'greedy decode {rows} x {length}: t5x_lite {rows * length / ours_s:,.0f} tokens/s, '
          f'HF generate {rows * length / hf_s:,.0f} tokens/s: {hf_s / ours_s:.2f}x; '
          f'{100 * agree:.1f}% of the tokens agree')
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  gin_utils.run(main, 'hf_reference')
