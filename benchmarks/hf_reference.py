"""The same model in Hugging Face transformers (PyTorch) against t5x_lite, on one device.

    python benchmarks/hf_reference.py --gin_file=gin/bench_t5_cpu.gin \
        [--device=cpu|gpu] [--mode=train,decode] [--steps=N] [--rounds=R] \
        [--batches=K] [--threads=T] [--peak_flops=F] [--gin.NAME=VALUE ...]

Needs the test extras (torch, transformers); the project itself does not.
A T5.1.1 (encoder-decoder) or GPT-2 (decoder) gin is rebuilt as a randomly
initialised HF model with the gin's dropout rates, saved, and read back
through `t5x_lite.hf.load`, so both frameworks run exactly the same weights.

--device, where both frameworks run:
  cpu (default)  JAX on its CPU platform, torch on T threads (default all cores).
  gpu            JAX's first GPU and torch's cuda:0, the same card (both count
                 the GPUs that CUDA_VISIBLE_DEVICES leaves, in CUDA's order).
                 Needs jax and torch built for CUDA; the data pipeline reads
                 the batches on the CPU. JAX allocates device memory as it
                 needs it (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set) and
                 torch empties its cache after each of its rounds, so that the
                 two share the card. float32 products run as TF32 on both
                 sides (JAX's default precision on GPU; torch's
                 `set_float32_matmul_precision('high')`).

Precision follows the gin's model config: `dtype = 'bfloat16'`
(`--gin.encoder_decoder.T5Config.dtype="'bfloat16'"`, GPT:
`--gin.decoder.GPTConfig.dtype="'bfloat16'"`) runs ours with bfloat16
activations and float32 params, and HF's forward pass and loss under
`torch.autocast(dtype=torch.bfloat16)` with float32 params too, in training
and in decoding. Params must be float32 (`param_dtype`).

mode train: K batches (default 4) are read from the gin's pipeline once,
before anything is timed, and both train steps cycle over those same K. R
alternating rounds of N timed steps (after one warm-up) of t5x_lite's train
step (`t5x_lite.benchmark.benchmark_train`, which blocks on each step's
result) and of HF's (forward, loss, backward, optimizer step; on GPU between
two `torch.cuda.synchronize()`); medians. HF's optimizer is the gin's kind:
`transformers.optimization.Adafactor` for `optimizers.adafactor`,
`torch.optim.AdamW` for `optimizers.adamw`.
Each framework's model FLOP/s (`benchmark.model_flops_per_step`) is given as a
fraction of its own float32 2048^3 matmul (jax.jit / torch.mm) timed in the
same rounds, and as MFU: model FLOPs per step / seconds per step / the
device's dense bfloat16 peak, looked up by its name in
`benchmark.PEAK_BF16_FLOPS` or given with --peak_flops=F (FLOP/s); no MFU for
a device with neither (a CPU).
mode decode: greedy decoding of the task's first batch to the decoder length,
EOS unreachable in both (HF: `generate` with eos_token_id None and
min_new_tokens = max_new_tokens), median of 3 timed runs each; the tokens of
the two are compared.

Prints one readable line per measurement and, last, one JSON object (with the
device, the versions of jax, torch, CUDA and transformers, and our kernels).

On one GPU, the bench model (add the dtype binding above for bfloat16):

    python benchmarks/hf_reference.py --gin_file=gin/bench_t5_cpu.gin --device=gpu \
        --steps=30 --rounds=2

T5.1.1-base, batch 64 of 512 / 114 tokens, on the embedded corpus:

    python benchmarks/hf_reference.py --gin_file=gin/t5_base_span.gin --device=gpu \
        --gin.MIXTURE_OR_TASK_NAME="'embedded_span_corruption'" --gin.BATCH_SIZE=64 \
        --gin.encoder_decoder.T5Config.dtype="'bfloat16'" --steps=20 --rounds=2

GPT-2 small, batch 32 of 1024 tokens:

    python benchmarks/hf_reference.py --gin_file=gin/gpt2_small_lm.gin --device=gpu \
        --gin.BATCH_SIZE=32 --gin.decoder.GPTConfig.dtype="'bfloat16'" --steps=20 --rounds=2
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import contextlib
import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time

import gin
import jax
import numpy as np
import torch
import transformers

from t5x_lite import benchmark
from t5x_lite import gin_utils
from t5x_lite import hf
from t5x_lite import ops
from t5x_lite import runs
from t5x_lite.data import pipeline
from t5x_lite.errors import UserError

DEVICES = ('cpu', 'gpu')
MODES = ('train', 'decode')


def parse_options(argv):
  """(this script's options, the remaining gin arguments) of a command line."""
  argv = list(argv)
  pop = lambda name: benchmark._pop_option(argv, name)  # pylint: disable=protected-access
  number = benchmark._number  # pylint: disable=protected-access
  modes = (pop('mode') or 'train,decode').split(',')
  if not modes or set(modes) - set(MODES):
    raise UserError(f"--mode={','.join(modes)} is unknown; use train, decode or train,decode.")
  device = pop('device') or 'cpu'
  if device not in DEVICES:
    raise UserError(f'--device={device} is unknown; use cpu or gpu.')
  options = {
      'modes': modes,
      'device': device,
      'steps': number(pop('steps'), 'steps', int, 10),
      'rounds': number(pop('rounds'), 'rounds', int, 1),
      'batches': number(pop('batches'), 'batches', int, 4),
      'threads': number(pop('threads'), 'threads', int, os.cpu_count()),
      'peak_flops': number(pop('peak_flops'), 'peak_flops', float, None),
  }
  return options, argv


def use_device(name):
  """(JAX's device, torch's device) for --device=name; JAX's work of the whole
  run goes to that platform. Call it before JAX starts its backends."""
  if name == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
    if jax.default_backend() != 'cpu':  # its backends had started already
      raise UserError(f'--device=cpu: JAX runs on {jax.default_backend()} already.')
    return jax.devices('cpu')[0], torch.device('cpu')
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leave room for torch
  if not torch.cuda.is_available():
    raise UserError(f'--device=gpu: torch {torch.__version__} sees no CUDA device; '
                    'install a CUDA build of torch, on a host with a GPU.')
  if jax.default_backend() != 'gpu':
    raise UserError(f'--device=gpu: JAX runs on {jax.default_backend()}, not a GPU; '
                    'install jax with CUDA (e.g. pip install "jax[cuda13]").')
  torch.set_float32_matmul_precision('high')  # TF32 products, as JAX's default on GPU
  return jax.devices('gpu')[0], torch.device('cuda', 0)


def synchronize(device):
  """Waits for the work queued on a torch device (nothing to wait for on CPU)."""
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def autocast(device, bfloat16):
  """HF's precision: bfloat16 autocast on `device`, or float32 as it is."""
  if not bfloat16:
    return contextlib.nullcontext()
  return torch.autocast(device.type, dtype=torch.bfloat16)


def precision(config):
  """True for bfloat16 activations (the config's dtype), False for float32;
  other dtypes and non-float32 params have no HF counterpart here."""
  dtype, param_dtype = str(config.dtype), str(config.param_dtype)
  if param_dtype != 'float32' or dtype not in ('float32', 'bfloat16'):
    raise UserError(f'dtype={dtype!r}, param_dtype={param_dtype!r}: the HF reference runs '
                    "float32 params with 'float32' or 'bfloat16' activations.")
  return dtype == 'bfloat16'


def hf_config(config):
  """The transformers config of one of our T5 / GPT configs (its dropout rates too)."""
  if hasattr(config, 'num_encoder_layers'):
    gated = len(config.mlp_activations) == 2
    return transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj=('gated-' if gated else '') + config.mlp_activations[0],
        dropout_rate=config.dropout_rate, tie_word_embeddings=config.logits_via_embedding,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  if hasattr(config, 'max_positions'):
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_embd=config.emb_dim, n_head=config.num_heads,
        n_layer=config.num_layers, n_inner=config.mlp_dim, n_positions=config.max_positions,
        resid_pdrop=config.dropout_rate, embd_pdrop=config.dropout_rate,
        attn_pdrop=config.attention_dropout_rate)
  raise UserError(f'{type(config).__name__} has no HF reference here; '
                  'use a T5.1.1 or GPT-2 gin.')


def same_weights(run, directory):
  """A random HF model of the gin's config, and our model (the gin's dtype) +
  params read from its save."""
  torch.manual_seed(run.seed)
  cls = (transformers.T5ForConditionalGeneration if hasattr(run.model.config, 'num_encoder_layers')
         else transformers.GPT2LMHeadModel)
  model = cls(hf_config(run.model.config))
  model.save_pretrained(directory)
  ours, params = hf.load(directory, scan_layers=run.model.config.scan_layers)
  ours = type(ours)(dataclasses.replace(ours.config, dtype=run.model.config.dtype))
  return model, ours, jax.device_put(params)


def gin_optimizer():
  """The kind of the gin's optimizer: 'adafactor' or 'adamw'."""
  try:
    name = gin.query_parameter('runs.TrainConfig.optimizer').configurable.name
  except (ValueError, AttributeError):
    name = None
  if name not in ('adafactor', 'adamw'):
    raise UserError(f'the gin\'s optimizer ({name}) has no HF counterpart here; '
                    'use optimizers.adafactor or optimizers.adamw.')
  return name


def hf_optimizer(kind, params):
  """HF's optimizer of the gin's kind (its step costs what the kind costs;
  the learning rate is immaterial to the timing)."""
  if kind == 'adamw':
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  return transformers.optimization.Adafactor(params, lr=1e-3, relative_step=False,
                                             scale_parameter=False, warmup_init=False)


def cached_dataset(batches):
  """A dataset that cycles over `batches` (numpy), as `benchmark_train` reads one."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  return tf.data.Dataset.from_tensor_slices(stacked).repeat()


def torch_batch(batch, encoder_decoder, device=torch.device('cpu')):
  """HF arguments of one of our batches on `device` (pads and packing ignored:
  same token count)."""
  t = lambda x: torch.from_numpy(np.asarray(x)).long().to(device)
  if encoder_decoder:
    labels = t(batch['decoder_target_tokens'])
    return {'input_ids': t(batch['encoder_input_tokens']),
            'labels': labels.masked_fill(labels == 0, -100)}
  return {'input_ids': t(batch['decoder_input_tokens']),
          'labels': t(batch['decoder_target_tokens'])}


def hf_train(model, batches, steps, device=torch.device('cpu'), bfloat16=False,
             optimizer='adafactor'):
  """Seconds of each of `steps` HF train steps after one warm-up, on a copy of
  `model` (whose weights decode mode compares)."""
  model = copy.deepcopy(model).train()
  opt = hf_optimizer(optimizer, model.parameters())
  times = []
  for i in range(steps + 1):
    batch = batches[i % len(batches)]
    synchronize(device)
    start = time.perf_counter()
    with autocast(device, bfloat16):
      loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    synchronize(device)
    if i:
      times.append(time.perf_counter() - start)
  return times


def torch_matmul_roofline(device=torch.device('cpu'), size=benchmark.ROOFLINE_SIZE):
  """FLOP/s of a float32 size^3 torch matmul on `device` (median), the
  ceiling of HF's products as `benchmark.matmul_roofline` is of ours."""
  def dot(x, y):
    torch.mm(x, y)
    synchronize(device)
  return benchmark.matmul_roofline(
      size, dot=dot, operands=[torch.randn(size, size, device=device) for _ in range(2)])


def hf_greedy(model, batch, length, encoder_decoder, device=torch.device('cpu'),
              bfloat16=False, repeats=3):
  """(tokens [B, length], median seconds) of HF greedy `generate`."""
  model.eval()
  config = model.generation_config
  config.eos_token_id = config.forced_eos_token_id = None
  config.pad_token_id = 0
  t = lambda x: torch.from_numpy(np.asarray(x)).long().to(device)
  if encoder_decoder:
    ids = t(batch['encoder_input_tokens'])
    kwargs = {'input_ids': ids, 'attention_mask': (ids > 0).long()}
  else:  # from BOS (id 0, also the pad id: say it is attended), as ours decodes
    ids = t(batch['decoder_input_tokens'])
    kwargs = {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}

  def generate():
    with autocast(device, bfloat16):
      out = model.generate(**kwargs, max_new_tokens=length, min_new_tokens=length,
                           do_sample=False, num_beams=1)
    synchronize(device)
    return out

  times = []
  with torch.no_grad():
    out = generate()
    for _ in range(repeats):
      start = time.perf_counter()
      generate()
      times.append(time.perf_counter() - start)
  return out[:, -length:].cpu().numpy(), statistics.median(times)


def versions():
  """The versions a result came from."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'torch': torch.__version__,
          'torch_cuda': torch.version.cuda, 'transformers': transformers.__version__}


def device_name(jax_device, torch_device):
  """The card's name for a GPU run, else JAX's description of the host."""
  if torch_device.type == 'cuda':
    return torch.cuda.get_device_name(torch_device)
  return benchmark.device_description()


def main(argv):
  options, argv = parse_options(argv)
  jax_device, device = use_device(options['device'])
  torch.set_num_threads(options['threads'])
  gin_utils.parse_gin(*gin_utils.parse_flags(argv))
  with jax.default_device(jax_device):
    compare(options, jax_device, device)


def compare(options, jax_device, device):
  """Times both frameworks as `main`'s options say, on one device each."""
  modes, steps, rounds = options['modes'], options['steps'], options['rounds']
  train_config = gin.get_configurable(runs.TrainConfig)()
  run = train_config.build(devices=[jax_device])
  config = run.model.config
  bfloat16 = precision(config)
  encoder_decoder = hasattr(config, 'num_encoder_layers')
  name = device_name(jax_device, device)
  peak = options['peak_flops'] or benchmark.peak_flops(name)
  result = {'device': name, 'torch_device': str(device), 'torch_threads': options['threads'],
            'dtype': 'bfloat16' if bfloat16 else 'float32', 'kernels': ops.active(),
            **versions()}
  with tempfile.TemporaryDirectory() as directory:
    model, ours, params = same_weights(run, directory)
  model = model.to(device)
  if 'train' in modes:
    optimizer = gin_optimizer()
    iterator = iter(run.dataset)
    batches = [pipeline.next_numpy(iterator) for _ in range(options['batches'])]
    del iterator
    ours_run = copy.copy(run)
    ours_run.dataset = cached_dataset(batches)
    tokens = sum(v.size for k, v in batches[0].items() if k.endswith('input_tokens'))
    hf_batches = [torch_batch(b, encoder_decoder, device) for b in batches]
    ours_times, hf_times, rooflines, torch_rooflines = [], [], [], []
    for r in range(rounds):
      ours_result, _ = benchmark.benchmark_train(ours_run, train_config.optimizer,
                                                 train_config.num_microbatches, steps,
                                                 input_seconds=0.1, peak=peak)
      ours_times.append(ours_result['seconds_per_step'])
      rooflines.append(ours_result['roofline_flops_per_second'])
      hf_times.append(statistics.median(hf_train(model, hf_batches, steps, device, bfloat16,
                                                 optimizer)))
      torch_rooflines.append(torch_matmul_roofline(device))
      if device.type == 'cuda':
        torch.cuda.empty_cache()  # hand the freed copy's memory back for JAX's next round
      print(f'round {r + 1}: t5x_lite {ours_times[-1]:.4f} s/step, '
            f'HF {hf_times[-1]:.4f} s/step', flush=True)
    ours_s, hf_s = statistics.median(ours_times), statistics.median(hf_times)
    result.update(train_rounds=rounds, train_steps=steps, train_batches=len(batches),
                  hf_optimizer=optimizer, tokens_per_step=int(tokens),
                  ours_seconds_per_step=ours_s, hf_seconds_per_step=hf_s,
                  ours_tokens_per_second=tokens / ours_s, hf_tokens_per_second=tokens / hf_s,
                  train_speedup=hf_s / ours_s, ours_rounds=ours_times, hf_rounds=hf_times)
    # Each framework's model FLOP/s over its own matmul ceiling in the same sitting,
    # and over the device's bfloat16 peak (MFU); the step time a speedup S over HF
    # needs is hf_s / S.
    flops = benchmark.model_flops_per_step(config, run.batch_shapes)
    roofline, torch_roofline = statistics.median(rooflines), statistics.median(torch_rooflines)
    ours_fraction, hf_fraction = flops / ours_s / roofline, flops / hf_s / torch_roofline
    ours_mfu, hf_mfu = benchmark.mfu(flops, ours_s, peak), benchmark.mfu(flops, hf_s, peak)
    result.update(model_flops_per_step=flops, roofline_flops_per_second=roofline,
                  torch_roofline_flops_per_second=torch_roofline,
                  ours_roofline_fraction=ours_fraction, hf_roofline_fraction=hf_fraction,
                  peak_flops_per_second=peak, ours_mfu=ours_mfu, hf_mfu=hf_mfu)
    mfu_text = (f'; MFU {100 * ours_mfu:.1f}% against HF\'s {100 * hf_mfu:.1f}% of '
                f'{peak / 1e12:.0f} TFLOP/s' if peak else '')
    print(f'train: t5x_lite {ours_s:.4f} s/step ({tokens / ours_s:,.0f} tokens/s), HF '
          f'{hf_s:.4f} s/step ({tokens / hf_s:,.0f} tokens/s): {hf_s / ours_s:.2f}x; '
          f'{100 * ours_fraction:.0f}% of the {roofline / 1e9:.0f} GFLOP/s JAX matmul roofline '
          f'against HF\'s {100 * hf_fraction:.0f}% of the {torch_roofline / 1e9:.0f} GFLOP/s '
          f'torch one; 1.2x HF would be {100 * 1.2 * flops / hf_s / roofline:.0f}% of ours'
          + mfu_text)
  if 'decode' in modes:
    batch, length = benchmark.decode_batch(run)
    rows = next(iter(batch.values())).shape[0]
    theirs, hf_s = hf_greedy(model, batch, length, encoder_decoder, device, bfloat16)
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
