"""Runs tests/multidevice (the layouts on 8 fake CPU devices, for every model
family) in one pytest process of its own: the devices must be asked for
before jax starts. The failure message lists every case's result."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO, run_env

MULTIDEVICE = os.path.join(REPO, 'tests', 'multidevice')


def run_multidevice(junit_path, *args):
  """python -m pytest on tests/multidevice with 8 devices; (process, {case: outcome})."""
  env = run_env(8)
  proc = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',
       f'--confcutdir={MULTIDEVICE}', f'--junitxml={junit_path}', *args, MULTIDEVICE],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  outcomes = {}
  if os.path.exists(junit_path):
    for case in ET.parse(junit_path).iter('testcase'):
      kinds = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
      outcomes[case.get('name')] = kinds[0] if kinds else 'passed'
  return proc, outcomes


@pytest.mark.slow
def test_multidevice_suite_on_eight_fake_devices(tmp_path):
  proc, outcomes = run_multidevice(str(tmp_path / 'results.xml'))
  report = '\n'.join(f'{outcome:8s} {name}' for name, outcome in outcomes.items())
  details = f'{report}\n\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}'
  assert proc.returncode == 0, details
  # Every family on the combined layout and T5 on every layout, each its own case.
  cases = [name for name in outcomes if name.startswith('test_same_losses_and_sharded_params')]
  assert len(cases) >= 7 and set(outcomes.values()) == {'passed'}, details
