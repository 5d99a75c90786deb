"""Every family and wrapper implements the Model interface (models/base.py),
and the trainer, evaluator and entry points use nothing else."""

import inspect
import os
import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from t5x_lite import rewards
from t5x_lite.models import base, classification, policy, preference, reward

import families
from conftest import REPO

CAPABILITIES = {'FRESH_PARAMS': tuple, 'DECODER_ONLY': bool, 'GENERATES': bool,
                'SCORES_RESPONSES': bool, 'computes_vocab_logits': bool}


def _models():
  models = {name: families.tiny(name) for name in families.NAMES}
  models['dpo_gpt'] = preference.DPOModel(families.tiny('gpt'))
  models['dpo_t5_precomputed'] = preference.DPOModel(
      families.tiny('t5'), reference_logps_path='/nonexistent.npz')
  models['reward_gpt'] = reward.RewardModel(classification.GptClassificationModel(
      families.config('gpt_cls'), num_classes=1))
  models['gpt_policy'] = policy.PolicyModel(families.tiny('gpt'), algorithm='ppo',
                                            reward=rewards.CharacterSetFraction())
  return models


@pytest.mark.parametrize('name', sorted(_models()))
def test_the_model_implements_the_interface(name):
  model = _models()[name]
  assert isinstance(model, base.BaseModel)
  for capability, kind in CAPABILITIES.items():
    assert isinstance(getattr(model, capability), kind), capability
  assert model.FEATURE_CONVERTER_CLS is not None
  assert model.max_length == (None if name.startswith(('t5', 'dpo_t5')) else 16)
  signature = inspect.signature(model.loss_fn)
  assert {'denominators', 'frozen'} <= set(signature.parameters)
  assert model.GENERATES == (name.startswith(('t5', 'gpt', 'bart', 'dpo'))
                             and not name.endswith('cls'))
  assert model.DECODER_ONLY == (name in ('gpt', 'gpt_scanned', 'gpt_cls', 'dpo_gpt', 'reward_gpt',
                                       'gpt_policy'))
  assert model.SCORES_RESPONSES == name.startswith('reward')


@pytest.mark.parametrize('name', ['bert', 'gpt', 'bert_cls', 'dpo_gpt'])
def test_the_interface_runs(name):
  """init, loss, denominators, logits, score and predictions on a real batch."""
  model = _models()[name]
  plain = model.model if isinstance(model, preference.DPOModel) else model
  batch = families.random_batch(plain, rows=4)
  params = nn.unbox(plain.init(jax.random.key(0), batch))['params']
  frozen = model.frozen_state(params)
  if isinstance(model, preference.DPOModel):
    assert set(frozen) == {'reference'}
    pairs = {f'{side}_{k}': v for side in ('chosen', 'rejected') for k, v in batch.items()}
    loss, metrics = model.loss_fn(params, pairs, None, frozen=frozen)
    assert float(loss) == pytest.approx(np.log(2), rel=1e-6)  # policy == reference
  else:
    assert frozen is None and model.frozen_shardings(None) is None
    loss, metrics = model.loss_fn(params, batch, None)
    assert float(metrics['loss']) == float(loss) > 0
  assert set(model.loss_denominators(batch if frozen is None else pairs)) > set()
  logits = model.logits(params, batch)
  assert logits.dtype == np.float32 and logits.shape[0] == 4
  assert model.score(params, batch).shape == (4,)
  predictions = model.predict_batch(params, batch, **(
      {'max_decode_length': 3} if model.GENERATES else {}))
  first = predictions[0] if model.GENERATES else predictions
  assert first.shape[0] == 4


def test_no_caller_probes_a_model_for_what_the_interface_declares():
  pattern = re.compile(r'(getattr|hasattr)\((self\.)?(run\.)?model\b|_apply\(|uses_reference_params')
  offenders = []
  for root, _, files in os.walk(os.path.join(REPO, 't5x_lite')):
    for f in files:
      path = os.path.join(root, f)
      if f.endswith('.py') and 'models' not in os.path.relpath(path, REPO).split(os.sep)[1:2]:
        with open(path) as fh:
          offenders += [f'{path}:{i}' for i, line in enumerate(fh, 1) if pattern.search(line)]
  assert not offenders, offenders
