"""Multi-host start-up: one JAX process per host, joined before any device use.

On a multi-host TPU slice every host runs the same command; the processes
find each other with `jax.distributed.initialize()`, then each sees the
global device list, reads its own shard of the data and feeds its local
devices (see `data.pipeline.get_dataset` and `Partitioner.shard_batch`).

`--distributed=auto` (the default) joins when the environment says this is
one of several hosts: a Cloud TPU VM slice (`TPU_WORKER_HOSTNAMES` lists more
than one worker), an explicit coordinator (`JAX_COORDINATOR_ADDRESS`, with
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`), or a SLURM job of several tasks.
`--distributed=on` always joins (JAX then detects the cluster itself);
`off` never does.
"""

import os
from typing import Optional

import jax

from t5x_lite.errors import UserError

MODES = ('auto', 'on', 'off')


def multihost_environment() -> Optional[str]:
  """What says this process is one of several hosts, or None."""
  workers = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  if len(workers) > 1:
    return f'Cloud TPU VM slice of {len(workers)} hosts'
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return f"coordinator {os.environ['JAX_COORDINATOR_ADDRESS']}"
  if int(os.environ.get('SLURM_NTASKS', '1') or '1') > 1:
    return f"SLURM job of {os.environ['SLURM_NTASKS']} tasks"
  return None


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value else None


def initialize(mode: str = 'auto') -> bool:
  """Joins the other hosts' processes if `mode` says so; True when it did."""
  if mode not in MODES:
    raise UserError(f'--distributed={mode} is not one of {", ".join(MODES)}.')
  if mode == 'off' or (mode == 'auto' and multihost_environment() is None):
    return False
  try:
    jax.distributed.initialize(num_processes=_env_int('JAX_NUM_PROCESSES'),
                               process_id=_env_int('JAX_PROCESS_ID'))
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'joining the other hosts failed ({first}); set JAX_COORDINATOR_ADDRESS, '
                    'JAX_NUM_PROCESSES and JAX_PROCESS_ID, or pass --distributed=off '
                    'on a single host.') from None
  return True
