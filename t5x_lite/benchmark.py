"""Measures the speed of a gin's train step and decoding on this host's devices.

    python -m t5x_lite.benchmark --gin_file=gin/bench_t5_cpu.gin [--gin.NAME=VALUE ...]
        [--mode=train|decode|train,decode] [--steps=N] [--decode_runs=N]
        [--input_seconds=S] [--profile=N] [--peak_flops=F]

The gin is a training gin: its `runs.TrainConfig` gives the model, optimizer,
data (task, feature lengths, batch size, vocabulary, packing), partitioner and
microbatches. Nothing is written to MODEL_DIR.

mode train (default): compiles the train step, runs one warm-up step and
--steps timed steps (default 20) on real batches, blocking on each step's
result (reading the batch is outside the timed part); then pulls batches from
the input pipeline alone for --input_seconds (default 3) and times a float32
2048^3 matmul (the roofline). `input_to_step_ratio` is the pipeline's batches/s
over the step's: below 1 the input pipeline would hold training back.
mode decode: greedy and beam-4 KV-cached decoding (`model.predict_batch`) of
the task's first batch (T5: its encoder inputs; decoder-only: from BOS) to the
decoder feature length, EOS unreachable so that every run takes the full
length; the median of --decode_runs runs (default 3) after a compiling one.
Tokens/s counts rows x steps. The params are random, or with train,decode the
ones the timed steps left.

--profile=N (train mode): traces two more steps with `jax.profiler` and
prints the N costliest parts of the step: the wall time during which the
executed XLA operations ran (counted once however many threads ran them),
gathered by the model code they came from (its `op_name` metadata with
layer numbers folded: `fwd|bwd <module path>/<primitive>`, or with no
prefix for work outside the model, such as `optimizer/...`). The JSON then
carries them as `profile` [[milliseconds per step, part], ...]. The thunk
names come from the CPU runtime's trace; other backends may name them
differently, and then the list is empty.

Prints one summary line; the last line of stdout is one JSON object.
`host_malloc` says whether freed host memory is kept for reuse ('reuse', the
default on a Linux host without accelerators; see t5x_lite/host.py) or
malloc was left as it is ('system', with T5X_LITE_MALLOC=system).

Analytic FLOPs (`model_flops_per_step`) count matmuls only, forward + backward
= 3 x forward, a multiply-add being 2 FLOPs. With d = emb_dim,
a = num_heads * head_dim, f = mlp_dim, m = number of MLP input projections
(2 for a gated MLP), V = vocab_size, B = batch, and Le, Ld the encoder and
decoder lengths (Te = B Le, Td = B Ld tokens):

  encoder layer      P_enc = 4 d a + (m + 1) d f          on Te tokens
                     (grouped-query attention: 2 d a + 2 d a_kv for the 4 d a)
  decoder layer      P_dec = 4 d a + 2 d a + (m + 1) d f   on Td tokens
                     (self-attention, cross-attention q and o, MLP)
                     + 2 d a (cross-attention k and v)     on Te tokens
  output layer       d V                                   on Td tokens
                     (none for a classifier with no LM loss: its head
                     sees one position per example)
  attention          2 a Lq Lk per sequence for q.k and as much for the
                     weighted sum of v: Le^2 (encoder), Ld^2 and Ld Le (decoder)

  FLOPs = 6 [Te (n_enc P_enc + n_dec 2 d a) + Td (n_dec P_dec + d V)]
        + 12 a B [n_enc Le^2 + n_dec (Ld^2 + Ld Le)]

i.e. 6 N T for the non-embedding params N, each on the tokens it sees, plus
the output layer and the attention. A single stack (decoder-only or
encoder-only) of n layers over B x L tokens: 6 B L (n P_enc + d V) +
12 a B n L^2. Causal masks are not discounted (the step computes the full
score matrix). Norms, softmax, position biases, the loss and the optimizer
update are left out, which is why XLA's count is somewhat higher.

`xla_flops_per_step` is XLA's cost analysis of the compiled (partitioned)
step times the devices of the mesh; `roofline_fraction` is the achieved
model FLOP/s per device over the roofline of one device.

`mfu` (model FLOPs utilisation) is the achieved model FLOP/s per device over
the device's dense bfloat16 peak, `peak_flops_per_second`: looked up by the
device's name in PEAK_BF16_FLOPS, or given with --peak_flops=F (FLOP/s of one
device); null where neither gives one (a CPU). It uses that peak whatever the
step's dtype, so a float32 step's MFU says how far it is from the chip's
bfloat16 ceiling.

`kernels` says which model kernels the step ran on ('plain' or 'cpu', see
t5x_lite.ops).
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import functools
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import gin_utils
from t5x_lite import host
from t5x_lite import ops
from t5x_lite import rollouts
from t5x_lite import runs
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import pipeline
from t5x_lite.errors import UserError

ROOFLINE_SIZE = 2048
DECODE_BEAMS = 4

# Dense (not 2:4 sparse) bfloat16 peak FLOP/s of one device, by the device's
# name as torch.cuda.get_device_name() and jax's `device_kind` give it
# ('NVIDIA H100 80GB HBM3', 'TPU v5 lite'): the first key found in the
# lower-cased name as whole words wins, so the more specific keys come first.
# From the vendors' data sheets, at boost clock; --peak_flops overrides.
PEAK_BF16_FLOPS = (
    ('h100 pcie', 756e12),
    ('h100 nvl', 835e12),
    ('h100', 989e12),  # SXM
    ('h200 nvl', 835e12),
    ('h200', 989e12),  # SXM
    ('gh200', 989e12),
    ('a100', 312e12),
    ('l40s', 362e12),
    ('l4', 121e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),  # v5p
    ('tpu v6 lite', 918e12),
    ('tpu v6e', 918e12),
)


def model_flops_per_step(config: Any, batch_shapes: Mapping[str, Any],
                         vocab_logits: bool = True) -> float:
  """Analytic training FLOPs of one step (see the module docstring); with
  `vocab_logits` False (a classifier's step) no output layer over the vocabulary."""
  d, f = config.emb_dim, config.mlp_dim
  vocab = config.vocab_size if vocab_logits else 0
  a = config.num_heads * config.head_dim
  kv = getattr(config, 'num_kv_heads', config.num_heads) * config.head_dim  # GQA: fewer
  mlp_inputs = len(getattr(config, 'mlp_activations', ('linear',)))
  attention_proj, mlp = 2 * d * a + 2 * d * kv, (mlp_inputs + 1) * d * f
  if hasattr(config, 'num_encoder_layers'):
    batch, le = batch_shapes['encoder_input_tokens'].shape
    ld = batch_shapes['decoder_input_tokens'].shape[1]
    n_enc, n_dec = config.num_encoder_layers, config.num_decoder_layers
    dense = (batch * le * (n_enc * (attention_proj + mlp) + n_dec * 2 * d * a)
             + batch * ld * (n_dec * (attention_proj + 2 * d * a + mlp) + d * vocab))
    attention = 4 * a * batch * (n_enc * le * le + n_dec * (ld * ld + ld * le))
  else:
    streams = [k for k in batch_shapes if k.endswith('input_tokens')]
    if len(streams) != 1:
      raise UserError(f'cannot count FLOPs for a batch with token streams {streams}; '
                      'expected one *input_tokens feature or encoder and decoder ones.')
    batch, length = batch_shapes[streams[0]].shape
    dense = batch * length * (config.num_layers * (attention_proj + mlp) + d * vocab)
    attention = 4 * a * batch * config.num_layers * length * length
  return float(3 * (2 * dense + attention))


def xla_flops(compiled: Any) -> Optional[float]:
  """FLOPs of a compiled computation by XLA's cost analysis (None if unknown)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def matmul_roofline(size: int = ROOFLINE_SIZE, repeats: int = 5, dot: Any = None,
                    operands: Any = None) -> float:
  """FLOP/s of a float32 size^3 matmul (median of `repeats` after a warm-up):
  jitted on the default device, or `dot(*operands)` (e.g. torch.mm), which
  must return when its result is ready."""
  if dot is None:
    rng = np.random.default_rng(0)
    operands = [jnp.asarray(rng.standard_normal((size, size), np.float32)) for _ in range(2)]
    dot = lambda x, y, f=jax.jit(jnp.dot): jax.block_until_ready(f(x, y))
  dot(*operands)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(*operands)
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times)


def peak_flops(device_name: str) -> Optional[float]:
  """The dense bfloat16 peak FLOP/s of a device by its name (PEAK_BF16_FLOPS),
  None for a device not listed (CPUs among them)."""
  name = ' '.join(re.split(r'[\s_-]+', device_name.lower()))
  for key, flops in PEAK_BF16_FLOPS:
    if re.search(rf'(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])', name):
      return flops
  return None


def mfu(model_flops: float, seconds: float, peak: Optional[float],
        devices: int = 1) -> Optional[float]:
  """Model FLOPs utilisation: model FLOPs per step / step seconds / devices /
  one device's peak FLOP/s (None without a peak)."""
  return model_flops / seconds / devices / peak if peak else None


def input_throughput(ds: Any, seconds: float) -> float:
  """Batches per second pulled from a fresh iterator of `ds` (first batch untimed)."""
  iterator = iter(ds)
  pipeline.next_numpy(iterator)
  count, start = 0, time.perf_counter()
  while count == 0 or time.perf_counter() - start < seconds:
    pipeline.next_numpy(iterator)
    count += 1
  return count / (time.perf_counter() - start)


def peak_host_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024  # Linux reports KiB


def peak_device_bytes() -> Optional[int]:
  """The largest peak memory in use over local devices, if the backend reports it."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def device_description() -> str:
  device = jax.local_devices()[0]
  kind = device.platform if device.device_kind == device.platform else (
      f'{device.platform} {device.device_kind}')
  return f'{jax.device_count()} x {kind} ({os.cpu_count()} host cores)'


def benchmark_train(run: runs.Run, optimizer: Any, num_microbatches: int = 1, steps: int = 20, input_seconds: float = 3.0,
                    profile: int = 0, peak: Optional[float] = None) -> tuple[dict[str, Any], Any]:
  """(train-step speed, FLOPs, MFU and input-pipeline headroom, the final
  params); `peak`: one device's peak FLOP/s for the MFU (default: looked up
  by the mesh's device name)."""
  trainer = run.trainer(optimizer, num_microbatches)
  compile_seconds = trainer.compile()
  step_fn = trainer.train_step
  state = trainer.init_state(run.seed)
  iterator = iter(run.dataset)
  times = []
  for i in range(steps + 1):  # the first is the warm-up
    batch = run.partitioner.shard_batch(pipeline.next_numpy(iterator))
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    if i:
      times.append(time.perf_counter() - start)
  parts = []
  if profile:
    parts, state = profile_step(step_fn, state, batch, profile)
  del iterator
  seconds = statistics.median(times)
  shapes = run.batch_shapes
  tokens = sum(math.prod(v.shape) for k, v in shapes.items() if k.endswith('input_tokens'))
  model_flops = model_flops_per_step(run.model.config, shapes, run.model.computes_vocab_logits)
  roofline = matmul_roofline()
  input_batches = input_throughput(run.dataset, input_seconds)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(trainer.abstract_params))
  achieved = model_flops / seconds
  devices = run.partitioner.mesh.size
  peak = peak or peak_flops(run.partitioner.mesh.devices.flat[0].device_kind)
  per_device = xla_flops(step_fn)
  loss = float(metrics['loss'])
  return {
      'params': int(n_params),
      'batch_shapes': {k: list(v.shape) for k, v in shapes.items()},
      'steps': steps,
      'loss': loss if math.isfinite(loss) else None,
      'compile_seconds': compile_seconds,
      'seconds_per_step': seconds,
      'seconds_per_step_min': min(times),
      'seconds_per_step_max': max(times),
      'tokens_per_step': int(tokens),
      'tokens_per_second': tokens / seconds,
      'model_flops_per_step': model_flops,
      'xla_flops_per_step': per_device and per_device * devices,
      'model_flops_per_second': achieved,
      'roofline_flops_per_second': roofline,
      'roofline_fraction': achieved / devices / roofline,
      'peak_flops_per_second': peak,
      'mfu': mfu(model_flops, seconds, peak, devices),
      'input_batches_per_second': input_batches,
      'input_examples_per_second': input_batches * run.batch_size,
      'step_batches_per_second': 1 / seconds,
      'input_to_step_ratio': input_batches * seconds,
      **({'profile': [[round(ms, 2), part] for ms, part in parts]} if profile else {}),
  }, state.params


def profile_step(step_fn: Any, state: Any, batch: Any, top: int,
                 steps: int = 2) -> tuple[list[tuple[float, str]], Any]:
  """(the `top` costliest parts of the step, [(ms per step, part)] (see --profile),
  the state after the profiled steps)."""
  import glob, gzip, re, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', step_fn.as_text(),
                       re.M):
    op = re.sub(r'layers_\d+', 'layers_*', m.group(2))
    # 'jvp(scope)' and 'transpose(jvp(scope))' wrap a named scope entered under autodiff.
    parts = [re.sub(r'^(?:transpose\(|jvp\()+(.*?)\)*$', r'\1', p) for p in op.split('/')[1:]]
    parts = [p for p, after in zip(parts, parts[1:] + ['']) if p and not after.startswith(p)]
    kind = 'bwd ' if 'transpose(' in op else 'fwd ' if 'jvp(' in op else ''
    names[m.group(1)] = kind + '/'.join(parts)
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
    events = []
    for path in glob.glob(f'{directory}/**/*.trace.json.gz', recursive=True):
      with gzip.open(path) as f:
        trace = json.load(f)
      events += trace['traceEvents'] if isinstance(trace, dict) else trace
  spans = {}  # part -> [(start, end)] in microseconds, over every thread
  for event in events:
    part = names.get(event.get('name'))
    if event.get('ph') == 'X' and part:
      spans.setdefault(part, []).append((event['ts'], event['ts'] + event['dur']))
  totals = {part: _covered(intervals) / 1e3 / steps for part, intervals in spans.items()}
  return sorted(((ms, part) for part, ms in totals.items()), reverse=True)[:top], state


def _covered(intervals: list[tuple[float, float]]) -> float:
  """The length of the union of the intervals: wall time, however many threads
  ran a part at once."""
  total, reached = 0.0, float('-inf')
  for start, end in sorted(intervals):
    total += max(0.0, end - max(start, reached))
    reached = max(reached, end)
  return total


def random_params(run: runs.Run) -> Any:
  """Freshly initialised params, created sharded on the partitioner's mesh."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  _, shardings = trainer_lib.abstract_params(run.model, run.partitioner, run.batch_shapes)
  init = lambda rng: nn.unbox(run.model.init(rng, run.batch_shapes))['params']
  with run.partitioner.activate():
    return jax.jit(init, out_shardings=shardings)(jax.random.key(run.seed))


def decode_batch(run: runs.Run) -> tuple[dict[str, np.ndarray], int]:
  """(the prompt batch of the task's first batch, the decoder length): T5 / BART
  decode from their encoder inputs, a decoder-only model from BOS alone."""
  first = pipeline.next_numpy(iter(run.dataset))
  if 'decoder_input_tokens' not in first or not run.model.GENERATES:
    raise UserError(f'--mode=decode needs a model that generates (T5, BART, GPT); '
                    f'{type(run.model).__name__} does not; use --mode=train.')
  rows, length = first['decoder_input_tokens'].shape
  if 'encoder_input_tokens' in first:
    return {'encoder_input_tokens': first['encoder_input_tokens']}, length
  return {'decoder_input_tokens': np.zeros((rows, 1), np.int32)}, length


def time_decode(model: Any, params: Any, batch: Mapping[str, np.ndarray], length: int,
                options: Mapping[str, Any], repeats: int = 3) -> tuple[np.ndarray, float, float]:
  """(tokens, compile seconds, median seconds of `repeats` runs) of jitted
  `model.predict_batch(**options)` to `length` tokens, EOS unreachable."""
  eos = model.config.vocab_size  # never generated
  fn = jax.jit(functools.partial(model.predict_batch, max_decode_length=length, eos_id=eos,
                                 **options))
  start = time.perf_counter()
  tokens, _ = jax.block_until_ready(fn(params, batch))
  compile_seconds = time.perf_counter() - start
  rows = next(iter(batch.values())).shape[0]
  if tokens.shape != (rows, length):
    raise AssertionError(f'{options} decoded {tokens.shape}, expected {(rows, length)}')
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, batch))
    times.append(time.perf_counter() - start)
  return np.asarray(tokens), compile_seconds, statistics.median(times)


def benchmark_decode(run: runs.Run, params: Any, repeats: int = 3) -> dict[str, Any]:
  """Greedy and beam-4 KV-cached decoding speed, in generated tokens (rows x steps) / s."""
  batch, length = decode_batch(run)
  rows = next(iter(batch.values())).shape[0]
  result = {'decode_batch_size': rows, 'decode_length': int(length), 'decode_runs': repeats}
  for name, options in (('greedy', {'method': 'greedy'}),
                        (f'beam{DECODE_BEAMS}', {'method': 'beam', 'num_beams': DECODE_BEAMS})):
    _, compile_seconds, seconds = time_decode(run.model, params, batch, length, options, repeats)
    result[f'{name}_compile_seconds'] = compile_seconds
    result[f'{name}_seconds'] = seconds
    result[f'{name}_tokens_per_second'] = rows * length / seconds
  return result


def summary(result: Mapping[str, Any]) -> str:
  """One readable line of a result."""
  parts = [f"{result['mode']} on {result['device']}"]
  if 'seconds_per_step' in result:
    xla = result['xla_flops_per_step']
    xla_text = f'{xla / 1e9:.2f}' if xla else 'n/a'
    parts.append(
        f"{result['params']:,} params, {result['seconds_per_step']:.3f} s/step "
        f"(min {result['seconds_per_step_min']:.3f}, max {result['seconds_per_step_max']:.3f}, "
        f"{result['steps']} steps), {result['tokens_per_second']:,.0f} tokens/s, "
        f"compile {result['compile_seconds']:.1f}s, GFLOP/step model "
        f"{result['model_flops_per_step'] / 1e9:.2f} / XLA {xla_text}, "
        f"{result['model_flops_per_second'] / 1e9:.1f} GFLOP/s = "
        f"{100 * result['roofline_fraction']:.0f}% of the "
        f"{result['roofline_flops_per_second'] / 1e9:.0f} GFLOP/s matmul roofline, "
        + (f"MFU {100 * result['mfu']:.1f}% of {result['peak_flops_per_second'] / 1e12:.0f} "
           f"TFLOP/s, " if result.get('mfu') else '')
        + f"input pipeline {result['input_to_step_ratio']:.1f}x the step's rate")
  if 'greedy_tokens_per_second' in result:
    beam = f'beam{DECODE_BEAMS}'
    parts.append(f"decode {result['decode_batch_size']} x {result['decode_length']}: greedy "
                 f"{result['greedy_tokens_per_second']:,.0f} tokens/s, {beam} "
                 f"{result[f'{beam}_tokens_per_second']:,.0f} tokens/s")
  parts.append(f"peak RSS {result['peak_host_bytes'] / 2**30:.2f} GiB "
               f"(host malloc {result['host_malloc']}, {result.get('kernels')} kernels)")
  return '; '.join(parts)


def _pop_option(argv: list[str], name: str) -> Optional[str]:
  """Removes `--name=V` or `--name V` from argv and returns V (None if absent)."""
  for i, arg in enumerate(argv):
    if arg == f'--{name}':
      if i + 1 == len(argv):
        raise UserError(f'--{name} needs a value.')
      value = argv[i + 1]
      del argv[i:i + 2]
      return value
    if arg.startswith(f'--{name}='):
      del argv[i]
      return arg.split('=', 1)[1]
  return None


def _number(value: Optional[str], name: str, kind: type, default: Any) -> Any:
  """The positive number `value` of flag --name (`default` when absent)."""
  if value is None:
    return default
  try:
    number = kind(value)
  except ValueError:
    number = 0
  if not number > 0:
    raise UserError(f'--{name}={value} must be a positive {kind.__name__}; e.g. --{name}=5.')
  return number


def main(argv: Sequence[str]) -> None:
  argv = list(argv)
  modes = (_pop_option(argv, 'mode') or 'train').split(',')
  if not modes or set(modes) - {'train', 'decode'}:
    raise UserError(f"--mode={','.join(modes)} is unknown; use train, decode or train,decode.")
  steps = _number(_pop_option(argv, 'steps'), 'steps', int, 20)
  decode_runs = _number(_pop_option(argv, 'decode_runs'), 'decode_runs', int, 3)
  input_seconds = _number(_pop_option(argv, 'input_seconds'), 'input_seconds', float, 3.0)
  profile = _number(_pop_option(argv, 'profile'), 'profile', int, 0)
  peak = _number(_pop_option(argv, 'peak_flops'), 'peak_flops', float, None)
  gin_utils.parse_gin(*gin_utils.parse_flags(argv))
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  config = gin.get_configurable(runs.TrainConfig)()
  if rollouts.policy_of(config.model) is not None:
    raise UserError('an RL run is timed per iteration by train itself (rollout_seconds, '
                    'update_seconds and their tokens/s in metrics.jsonl); see '
                    'benchmarks/rl_table.py.')
  run = config.build()
  result = {'mode': ','.join(modes), 'device': device_description()}
  params = None
  if 'train' in modes:
    train_result, params = benchmark_train(run, config.optimizer, config.num_microbatches,
                                           steps, input_seconds, profile, peak)
    result.update(train_result)
  if 'decode' in modes:
    result.update(benchmark_decode(run, random_params(run) if params is None else params,
                                   decode_runs))
  result.update(peak_host_bytes=peak_host_bytes(), peak_device_bytes=peak_device_bytes(),
                host_malloc=host.malloc_policy(), kernels=ops.active())
  for ms, part in result.get('profile', []):
    print(f'{ms:9.1f} ms  {part}')
  print(summary(result))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  import t5x_lite.benchmark as benchmark_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(benchmark_module.main, 'benchmark')
