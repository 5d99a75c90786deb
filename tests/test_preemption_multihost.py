"""Two processes of one run: SIGTERM on one of them makes both save the same
step and exit 143; the re-run resumes exactly, each process reading its own
shard (the losses of an uninterrupted run over both shards), and process 0
alone reports."""

import json
import os
import signal
import time

import numpy as np
import pytest

from conftest import SMALL_T5, read_metrics
from test_multihost import _expected_losses, launch_two_hosts

pytestmark = pytest.mark.slow


def _steps_logged(model_dir):
  try:
    return len(read_metrics(model_dir))
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def test_sigterm_on_one_host_saves_one_step_everywhere_and_resumes(tmp_path):
  base = [*SMALL_T5, '--gin.train_script.CheckpointConfig.async_save=False']
  procs = launch_two_hosts([*base, '--gin.TRAIN_STEPS=400', '--gin.CHECKPOINT_PERIOD=1000'], tmp_path)
  deadline = time.time() + 300
  while _steps_logged(tmp_path) < 3 and time.time() < deadline and procs[0].poll() is None:
    time.sleep(0.2)
  assert _steps_logged(tmp_path) >= 3, procs[0].communicate(timeout=60)[1][-3000:]
  procs[1].send_signal(signal.SIGTERM)  # only the second host is preempted
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], [o[1][-2000:] for o in outs]
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 400, saved
  step = saved[0]
  assert f'SIGTERM: saved checkpoint {tmp_path}/checkpoints/{step}' in outs[0][0]
  step_dir = tmp_path / 'checkpoints' / str(step)
  assert {f.split('.')[0] for f in os.listdir(step_dir / 'data')} >= {'process_0', 'process_1'}

  resumed = [*base, f'--gin.TRAIN_STEPS={step + 2}']
  procs = launch_two_hosts(resumed, tmp_path)
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
  assert f'resumed from {tmp_path}/checkpoints/{step}' in outs[0][0]
  assert "mesh {'data': 2" in outs[0][0]
  assert 'MODEL_DIR' not in outs[1][0] and 'done:' not in outs[1][0]  # process 0 reports
  rows = read_metrics(tmp_path)
  assert [r['step'] for r in rows] == list(range(1, step + 3))
  np.testing.assert_allclose([r['loss'] for r in rows],
                             _expected_losses(resumed, step + 2, num_hosts=2), rtol=1e-5)
  meta = json.loads((tmp_path / 'checkpoints' / str(step + 2) / 'meta' / 'metadata').read_text())
  assert meta['step'] == step + 2
