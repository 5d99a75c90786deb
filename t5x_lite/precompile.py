"""Ahead-of-time compilation of the train step for a TPU slice, on any host.

    python -m t5x_lite.precompile --gin_file=gin/bert_base_mlm.gin --topology=v3:4x4 \
        [--gin.NAME=VALUE ...]

Compiles the real train step (model, optimizer, feature lengths, batch size and
partitioner from the same gin as training) for the slice's devices, described
by libtpu without a TPU, from shapes alone (no data, no arrays). Prints the
per-device memory against the chip's HBM, the FLOPs of one step, the step time
at the chip's peak and at half of it, and the days for TRAIN_STEPS. Exits with
one line "does not fit: ..." (status 2) when the step needs more HBM than a
device has. Needs libtpu: `pip install -e .[tpu]`. Meanwhile stderr says what
it compiles and, when done, in how many seconds.

The model kernels are those of the slice, not of this host: the run's
`ops.kernels.name` ('auto' unless bound) resolves for TPU, so 'auto' compiles
the plain einsum path that training on the slice runs;
`--gin.ops.kernels.name="'cpu'"` compiles the XLA:CPU kernels instead, to
compare the two.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.with_raised_stack_limit('t5x_lite.precompile')  # the TPU compiler's threads
  host.prepare()

import dataclasses
import importlib.util
import math
import os
import re
import sys
from typing import Any, Sequence

import gin
import jax

from t5x_lite import gin_utils
from t5x_lite import host
from t5x_lite import ops
from t5x_lite import progress
from t5x_lite import runs
from t5x_lite.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: HBM and peak bf16 matmul throughput (public Cloud TPU figures)."""
  hbm_bytes: int
  peak_flops: float
  accelerator_type: str  # Cloud's name for a slice of N TensorCores: f'{name}-{N}'
  cores: int = 1
  megacore: bool = False  # its TensorCores form one JAX device


# Per chip, from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v3 ... /v6e). A v3 chip has two TensorCores, each a
# JAX device with its own 16 GiB of the chip's 32 GiB; v4 and v5p chips run
# their two TensorCores as one megacore device; v5e and v6e chips have one.
CHIPS = {
    'v3': Chip(hbm_bytes=32 * GiB, peak_flops=123e12, accelerator_type='v3', cores=2),
    'v4': Chip(hbm_bytes=32 * GiB, peak_flops=275e12, accelerator_type='v4', cores=2,
               megacore=True),
    'v5e': Chip(hbm_bytes=16 * GiB, peak_flops=197e12, accelerator_type='v5litepod'),
    'v5p': Chip(hbm_bytes=95 * GiB, peak_flops=459e12, accelerator_type='v5p', cores=2,
                megacore=True),
    'v6e': Chip(hbm_bytes=32 * GiB, peak_flops=918e12, accelerator_type='v6e'),
}

_TOPOLOGY = re.compile(r'^(v\d+[a-z]?):(\d+(?:x\d+)*)$')


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice described by libtpu: its devices and per-device budgets."""
  name: str
  devices: Sequence[Any]
  hbm_bytes_per_device: float
  peak_flops_per_device: float


def tpu_slice(topology: str) -> Slice:
  """The devices of a slice named like 'v3:4x4', 'v4:2x2x2' or 'v5e:4x4'."""
  match = _TOPOLOGY.match(topology)
  if not match or match.group(1) not in CHIPS:
    raise UserError(f"unknown topology '{topology}'; use GENERATION:CHIPS such as v3:4x4, "
                    f"v4:2x2x2 or v5e:4x4 (generations: {', '.join(CHIPS)}).")
  if importlib.util.find_spec('libtpu') is None:
    raise UserError('libtpu is not installed, so TPU topologies cannot be described; '
                    'install it with `pip install -e .[tpu]`.')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = CHIPS[match.group(1)]
  num_chips = math.prod(int(d) for d in match.group(2).split('x'))
  if not host.host_has_tpu():
    # libtpu reads the slice from the TPU VM's metadata and warns without it;
    # with no chip here to guard, compiling processes need not lock each other out.
    accelerator_type = f'{chip.accelerator_type}-{num_chips * chip.cores}'
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator_type)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  kwargs = {'chip_config_name': 'megacore'} if chip.megacore else {}
  try:
    devices = topologies.get_topology_desc(topology, 'tpu', **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"libtpu cannot describe topology '{topology}': "
                    f'{gin_utils.one_line(e)}; check the chip counts per dimension.') from None
  per_chip = len(devices) / num_chips
  return Slice(topology, devices, chip.hbm_bytes / per_chip, chip.peak_flops / per_chip)


@dataclasses.dataclass(frozen=True)
class Report:
  """What compiling the train step for a slice found."""
  mesh: dict[str, int]
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  total_bytes: int
  hbm_bytes: float
  flops: float
  step_seconds: float
  train_steps: int
  kernels: str  # the model kernels compiled, 'plain' or 'cpu' (see t5x_lite.ops)
  loop_factor: float = 1.0  # XLA's FLOP count x this = `flops` (see _loop_factor)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  def days(self, utilisation: float = 1.0) -> float:
    return self.train_steps * self.step_seconds / utilisation / 86400


def does_not_fit(needed: str, hbm_bytes: float) -> UserError:
  return UserError(f'does not fit: {needed} needed per device, {hbm_bytes / GiB:.2f} GiB '
                   'available; use a smaller BATCH_SIZE, a larger slice, or shard the params '
                   '(fsdp / model-parallel rules).')


def _out_of_memory(error: Exception, hbm_bytes: float) -> UserError:
  """The TPU compiler's out-of-HBM failure as the one-line verdict. It reads
  "Used 20.5G of 15.5G hbm" or "... required for HLO temporaries (1.06T) exceeds
  available HBM (15.75G)"."""
  used = re.search(r'(?:Used |required for [^(]*\()([\d.]+)([KMGT])', str(error))
  if not used:
    return does_not_fit(f'more than {hbm_bytes / GiB:.2f} GiB ({gin_utils.one_line(error)})',
                        hbm_bytes)
  scale = {'K': 2**10, 'M': 2**20, 'G': GiB, 'T': 2**40}
  return does_not_fit(f'{float(used.group(1)) * scale[used.group(2)] / GiB:.2f} GiB', hbm_bytes)


def _dot_flops(jaxpr: Any, repeat_scans: bool) -> float:
  """Matmul FLOPs (2 per multiply-add) of `jaxpr` and the jaxprs inside it. A
  scan's body counts `length` times, or once when not `repeat_scans`; a cond
  counts its costliest branch."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
      continue
    inner = []
    for value in eqn.params.values():
      for v in value if isinstance(value, (tuple, list)) else (value,):
        v = getattr(v, 'jaxpr', v)  # ClosedJaxpr -> Jaxpr
        if hasattr(v, 'eqns'):
          inner.append(_dot_flops(v, repeat_scans))
    if not inner:
      continue
    if eqn.primitive.name == 'cond':
      total += max(inner)
    else:
      times = eqn.params['length'] if repeat_scans and eqn.primitive.name == 'scan' else 1
      total += times * sum(inner)
  return total


def _loop_factor(trainer: Any, compiled: Any) -> float:
  """What XLA's FLOP count of a step with loops is multiplied by to count every
  iteration. XLA's cost analysis counts a while loop's body once, so a step
  with `scan_layers` would show one layer of each stack; the factor is the
  step's matmul FLOPs with every scan body repeated over those with each body
  once, both counted from its jaxpr (so the loops' other operations are taken
  to be in the same proportion to their matmuls as in the whole step)."""
  if not re.search(r'\bwhile\(', compiled.as_text() or ''):
    return 1.0
  jaxpr = trainer.step_jaxpr()
  once = _dot_flops(jaxpr, repeat_scans=False)
  return _dot_flops(jaxpr, repeat_scans=True) / once if once else 1.0


def precompile(topology: str, *, config: runs.TrainConfig, train_steps: int) -> Report:
  """Compiles the train step of `config` for `topology` (bound in gin by the
  run configs, as the training entry point is)."""
  tpu = tpu_slice(topology)
  run = config.build(devices=tpu.devices, check_data=False)
  data = config.data
  shapes = runs.converter_batch_shapes(run.model, data.task_feature_lengths, data.batch_size,
                                       data.pack)
  partitioner = run.partitioner
  # Traced for the slice: 'auto' resolves against TPU, not this host's CPU.
  with ops.use_kernels(gin_utils.kernels(), platform='tpu'):
    kernels = ops.active()
    trainer = run.trainer(config.optimizer, config.num_microbatches, batch_shapes=shapes)
    try:
      what = f'the train step for {topology} (mesh {dict(partitioner.mesh.shape)})'
      with progress.compiling(what, stream=sys.stderr, keep=False):
        seconds = trainer.compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' in str(e):
        raise _out_of_memory(e, tpu.hbm_bytes_per_device) from None
      raise
    compiled = trainer.compiled_step
    loop_factor = _loop_factor(trainer, compiled)
  memory = trainer.memory()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']) * loop_factor
  return Report(mesh=dict(partitioner.mesh.shape),
                compile_seconds=seconds,
                argument_bytes=memory.argument_bytes,
                output_bytes=memory.output_bytes,
                temp_bytes=memory.temp_bytes,
                total_bytes=memory.total_bytes,
                hbm_bytes=tpu.hbm_bytes_per_device,
                flops=flops,
                step_seconds=flops / tpu.peak_flops_per_device,
                train_steps=int(train_steps),
                kernels=kernels,
                loop_factor=loop_factor)


def describe(topology: str, report: Report) -> str:
  r = report
  return '\n'.join([
      f'{topology}: mesh {r.mesh}; compiled the train step ({r.kernels} kernels) in '
      f'{r.compile_seconds:.1f}s',
      f'per device: arguments {r.argument_bytes / GiB:.2f} GiB, outputs '
      f'{r.output_bytes / GiB:.2f} GiB, temporaries {r.temp_bytes / GiB:.2f} GiB, '
      f'total {r.total_bytes / GiB:.2f} GiB of {r.hbm_bytes / GiB:.2f} GiB HBM',
      f'FLOPs per step per device: {r.flops:.3e}' + (
          f" (XLA's count, which has each scanned loop's body once, x {r.loop_factor:.2f})"
          if r.loop_factor != 1 else ''),
      f'step time: {r.step_seconds * 1e3:.1f} ms at peak, {2 * r.step_seconds * 1e3:.1f} ms '
      f'at 50% of peak',
      f'TRAIN_STEPS={r.train_steps:,}: {r.days():.2f} days at peak, '
      f'{r.days(0.5):.2f} days at 50% of peak',
  ])


def main(argv: Sequence[str]) -> None:
  topology = [a.partition('=')[2] for a in argv if a.startswith('--topology=')]
  if len(topology) != 1:
    raise UserError('give exactly one --topology=GENERATION:CHIPS, e.g. --topology=v3:4x4.')
  files, bindings = gin_utils.parse_flags([a for a in argv if not a.startswith('--topology=')])
  gin_utils.parse_gin(files, bindings)
  report = gin.get_configurable(precompile)(topology[0])
  print(describe(topology[0], report))
  if not report.fits:
    raise does_not_fit(f'{report.total_bytes / GiB:.2f} GiB', report.hbm_bytes)


if __name__ == '__main__':
  import t5x_lite.precompile as precompile_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(precompile_module.main, 'precompile')
