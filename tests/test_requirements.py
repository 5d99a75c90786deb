"""conftest.require / require_shared_data: skip with the reason locally, fail
under CI (the CI environment variable set)."""

import json

import pytest

import conftest


@pytest.fixture(params=[None, 'true'], ids=['local', 'ci'])
def ci(request, monkeypatch):
  if request.param is None:
    monkeypatch.delenv('CI', raising=False)
  else:
    monkeypatch.setenv('CI', request.param)
  return request.param is not None


def test_present_module_and_data_are_returned(ci, tmp_path, monkeypatch):
  del ci
  assert conftest.require('json') is json
  (tmp_path / 'glue').mkdir()
  monkeypatch.setattr(conftest, 'SHARED_DATA', str(tmp_path))
  assert conftest.require_shared_data('glue') == str(tmp_path / 'glue')


def test_missing_module(ci):
  expected = pytest.fail.Exception if ci else pytest.skip.Exception
  with pytest.raises(expected) as missing:
    conftest.require('no_such_module_t5x_lite')
  message = str(missing.value)
  assert 'needs no_such_module_t5x_lite' in message
  assert "pip install -e '.[test]'" in message
  assert ('CI is set, so this fails instead of skipping' in message) == ci
  if not ci:  # also at a module's top level, as the HF parity modules use it
    assert missing.value.allow_module_level


def test_missing_shared_data(ci, tmp_path, monkeypatch):
  monkeypatch.setattr(conftest, 'SHARED_DATA', str(tmp_path))
  expected = pytest.fail.Exception if ci else pytest.skip.Exception
  with pytest.raises(expected) as missing:
    conftest.require_shared_data('glue', 'SST-2')
  message = str(missing.value)
  assert f"needs {tmp_path / 'glue' / 'SST-2'}" in message
  assert ('CI is set, so this fails instead of skipping' in message) == ci


def test_ci_empty_means_unset(monkeypatch):
  monkeypatch.setenv('CI', '')
  with pytest.raises(pytest.skip.Exception):
    conftest.require('no_such_module_t5x_lite')
