"""What rewards an RL rollout (`policy.PolicyModel.reward`, bound by gin).

A reward is either

  - a Python function of the decoded prompt and response that returns a
    float, called on the host for every response, e.g.
    `@rewards.CharacterSetFraction()` (the verifiable synthetic task),
    `@rewards.MatchesPattern()` (a format check) or your own
    `@my_module.my_reward` (its module imported in the gin file); or
  - `RewardModelReward`: a reward model's checkpoint (configs/runs/reward.gin)
    scored on the devices, its params sharded by the same logical rules as
    the policy's. It reads the policy's own token layout (prompt, response,
    EOS as one causal sequence), so it must be a decoder-only reward model
    with the policy's vocabulary and room for prompt + response.

A non-finite reward is not an error: the iteration's updates are skipped
like any non-finite step. A function that raises, or returns something that
is not a number, stops the run in one line naming the function.
"""

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

from t5x_lite.errors import UserError


class CharacterSetFraction:
  """The fraction of the response's characters that are in `characters`
  (0 for an empty response)."""

  def __init__(self, characters: str = 'aeiou'):
    self.characters = frozenset(characters)

  def __call__(self, prompt: str, response: str) -> float:
    del prompt
    return sum(c in self.characters for c in response) / len(response) if response else 0.0


class MatchesPattern:
  """1.0 when the response matches the regular expression `pattern`
  (`re.search`, DOTALL), else 0.0: a format reward such as
  r'^<think>.*</think>.+$'."""

  def __init__(self, pattern: str):
    self.pattern = re.compile(pattern, re.DOTALL)

  def __call__(self, prompt: str, response: str) -> float:
    del prompt
    return float(self.pattern.search(response) is not None)


@dataclasses.dataclass(frozen=True)
class RewardModelReward:
  """A trained reward model: `model` (a `reward.RewardModel`, e.g. %MODEL of
  its gin) and its `checkpoint_path` (a run directory or one step's)."""
  model: Any
  checkpoint_path: str


def name_of(fn: Callable[..., Any]) -> str:
  """A reward function's name for messages: its qualified name or class."""
  return getattr(fn, '__qualname__', None) or type(fn).__qualname__


def host_rewards(fn: Callable[[str, str], float], prompts: Sequence[str],
                 responses: Sequence[str]) -> np.ndarray:
  """[N] float32 rewards of `fn` for each (prompt, response)."""
  out = np.empty(len(responses), np.float32)
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    try:
      value = fn(prompt, response)
    except Exception as e:  # pylint: disable=broad-except  (reported with the function named)
      first = (str(e).strip().splitlines() or [''])[0]
      raise UserError(f'the reward function {name_of(fn)} raised {type(e).__name__}: {first} '
                      f'(prompt {prompt[:60]!r}, response {response[:60]!r})') from None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
      raise UserError(f'the reward function {name_of(fn)} returned {value!r}; it must return a '
                      'float for each (prompt, response).')
    out[i] = value
  return out
