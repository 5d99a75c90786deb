"""Prompt tasks for RL (`models.policy.PolicyModel`): a policy reads 'inputs'.

- `rl_letters`: the verifiable synthetic task. Prompts are random strings of
  4 to 12 consonants and digits (byte vocabulary, no EOS); the reward
  `rewards.CharacterSetFraction('aeiou')` is the fraction of the response's
  characters that are vowels, which a random policy over the 256 bytes
  meets about 2 % of the time. Splits 'train' (50,000 prompts) and
  'validation' (1,000), fixed by a seed.

Any task with an 'inputs' feature serves as prompts too: the preference
tasks (`t5x_lite.tasks.preferences`, e.g. the HH-RLHF sample) and the
instruction tasks (`t5x_lite.tasks.instructions`).
"""

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import sources

LETTERS = 'bcdfghjklmnpqrstvwxz0123456789'
_SIZES = {'train': 50_000, 'validation': 1_000}


def letters_prompts(split: str, seed: int = 0) -> list[str]:
  """The fixed prompts of a split of `rl_letters`."""
  rng = np.random.default_rng([seed, list(_SIZES).index(split)])
  alphabet = np.array(list(LETTERS))
  return [''.join(rng.choice(alphabet, size=rng.integers(4, 13))) for _ in range(_SIZES[split])]


def _letters_dataset_fn(split, shuffle_files, seed=None):
  prompts = letters_prompts(split)
  if shuffle_files:
    order = np.random.default_rng(None if seed is None else int(seed) % 2**31).permutation(
        len(prompts))
    prompts = [prompts[i] for i in order]
  return tf.data.Dataset.from_tensor_slices({'inputs': tf.constant(prompts)})


seqio.TaskRegistry.add(
    'rl_letters',
    source=sources.FunctionSource(dataset_fn=_letters_dataset_fn,
                                  splits=tuple(_SIZES)),
    preprocessors=[seqio.preprocessors.tokenize],
    output_features={'inputs': seqio.Feature(seqio.ByteVocabulary(), add_eos=False)},
    metric_fns=[])
