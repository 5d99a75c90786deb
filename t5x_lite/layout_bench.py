"""Times the train step of one model under the four layouts on 8 devices.

    python -m t5x_lite.layout_bench [--family t5|bert|gpt|bart] [--steps N]

On a host without 8 devices it fakes 8 CPU devices (XLA_FLAGS is set before jax
is imported). Prints compile seconds, the median step time over N steps after
one warm-up step, and each layout's step time relative to data parallelism;
stderr says which layout is compiling meanwhile.
Fake CPU devices share the host's cores, so the ratios show the cost of each
layout's communication and partitioning on CPU, not TPU speed.
"""

import argparse
import os
import statistics
import sys
import time

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_force_host_platform_device_count=8').strip()
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from t5x_lite import optimizers, progress, trainer  # pylint: disable=g-import-not-at-top
from t5x_lite.models import bart, decoder, encoder, encoder_decoder  # pylint: disable=g-import-not-at-top
from t5x_lite.partitioning import Partitioner  # pylint: disable=g-import-not-at-top

BATCH = 16
VOCAB = 4096
SIZE = dict(vocab_size=VOCAB, emb_dim=256, num_heads=8, head_dim=32, mlp_dim=1024,
            dropout_rate=0.0)
# family: (model, dummy_batch lengths)
FAMILIES = {
    't5': lambda: (encoder_decoder.EncoderDecoderModel(encoder_decoder.T5Config(
        **SIZE, num_encoder_layers=2, num_decoder_layers=2)), (128, 32)),
    'bert': lambda: (encoder.EncoderModel(encoder.BertConfig(
        **SIZE, num_layers=4, max_positions=128)), (128,)),
    'gpt': lambda: (decoder.DecoderModel(decoder.GPTConfig(
        **SIZE, num_layers=4, max_positions=128)), (128,)),
    'bart': lambda: (bart.BartModel(bart.BartConfig(
        **SIZE, num_encoder_layers=2, num_decoder_layers=2, max_positions=128)), (128, 32)),
}
LAYOUTS = {
    'data=8': ((8, 1, 1), 'data_parallel'),
    'fsdp=8': ((1, 8, 1), 'fsdp'),
    'data=4 x model=2': ((4, 1, 2), 'model_parallel'),
    'data=2 x fsdp=2 x model=2': ((2, 2, 2), 'fsdp_model_parallel'),
}


def random_batch(model, lengths, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens for every feature of the model's dummy batch."""
  rng = np.random.RandomState(seed)
  batch = {}
  for k, v in model.dummy_batch(BATCH, *lengths).items():
    if 'weights' in k:
      batch[k] = np.ones_like(v)
    elif 'segment' in k or 'label' in k:
      batch[k] = np.zeros_like(v)
    else:
      batch[k] = rng.randint(1, VOCAB, v.shape).astype(v.dtype)
  return batch


def time_layout(model, batch, mesh_shape, rules, steps: int,
                name: str = '') -> tuple[float, float]:
  """(compile seconds, median seconds per step). Says on stderr what it
  compiles (the layout `name`) while it does."""
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  t = trainer.Trainer(model, optimizers.adamw(1e-3), Partitioner(mesh_shape, rules=rules),
                      shapes)
  with progress.compiling(f'the train step for {name or mesh_shape}', stream=sys.stderr,
                          keep=False):
    compile_s = t.compile()
  state = t.init_state(0)
  sharded = t.partitioner.shard_batch(batch)
  times = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    state, metrics = t.train_step(state, sharded)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times[1:])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--family', choices=sorted(FAMILIES), default='t5')
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit(f'needs 8 devices, found {jax.device_count()}; run it in a fresh '
                     'process so that it can fake 8 CPU devices.')
  model, lengths = FAMILIES[args.family]()
  batch = random_batch(model, lengths)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)))
  print(f'{args.family}: {n_params / 1e6:.1f}M params, batch {BATCH} x {lengths}, '
        f'{jax.device_count()} {jax.devices()[0].platform} devices, '
        f'median of {args.steps} steps')
  print(f"{'layout':28s} {'compile s':>10s} {'step ms':>10s} {'vs data':>8s}", flush=True)
  baseline = None
  for name, (mesh_shape, rules) in LAYOUTS.items():
    compile_s, step_s = time_layout(model, batch, mesh_shape, rules, args.steps, name)
    baseline = baseline or step_s
    print(f'{name:28s} {compile_s:10.1f} {step_s * 1e3:10.1f} {step_s / baseline:8.2f}',
          flush=True)


if __name__ == '__main__':
  main()
