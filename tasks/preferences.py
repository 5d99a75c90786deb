"""Preference tasks for DPO and reward models: (prompt, chosen, rejected) from local files.

Every task has the features 'inputs' (the prompt), 'chosen' and 'rejected'
(the two responses, each ending with EOS), their '*_pretokenized' texts, and
'pair_key', an int64 fingerprint of the three texts that names the pair in a
cache of reference log-probs (`t5x_lite.precompute_reference`). The prompt
is fitted to the 'inputs' length keeping its end, each response to the
'targets' length keeping its start. As for instruction tasks, a name ending
in '_gpt' uses the embedded BPE vocabulary and no EOS after the prompt (one
causal sequence), a name ending in '_bert' the embedded WordPiece vocabulary
and no EOS at all (a BERT reward model frames the texts with [CLS] / [SEP]),
other names the embedded SentencePiece vocabulary (T5).

Your own files:

    from t5x_lite.tasks import preferences
    preferences.register_preference_task(
        'my_prefs_gpt', '/data/prefs/*.jsonl', format='pairs', num_validation=500)

Built in, over the samples in ../shared/data/preferences next to the
repository ($T5X_LITE_PREFERENCES_DIR overrides; always registered, a
missing file being one error naming it and the setting when the task is
used), each also with a '_gpt' and a '_bert' twin:

  hh_rlhf_harmless_sample   HH-RLHF harmless-base (format 'hh'); the first
                            20 pairs are 'validation'
  dpo_en_demo               LLaMA-Factory's dpo_en_demo.json (format
                            'sharegpt'); the first 30 pairs are 'validation'
  preference_mixture        both, by example count
"""

import os
from typing import Optional

import seqio
import tensorflow as tf

from t5x_lite.data import preferences
from t5x_lite.data import wordpiece
from t5x_lite.tasks import instructions as instruction_tasks

DATA_DIR_ENV = 'T5X_LITE_PREFERENCES_DIR'
RESPONSES = ('chosen', 'rejected')
BERT_SUFFIX = '_bert'
# Separates the texts in the pair fingerprint.
_SEP = '\x1f'


def data_dir() -> str:
  return os.environ.get(DATA_DIR_ENV) or os.path.normpath(
      os.path.join(instruction_tasks.data_dir(), '..', 'preferences'))


def pair_key(prompt, chosen, rejected) -> tf.Tensor:
  """The int64 fingerprint of a pair's three texts (strings or string tensors)."""
  joined = tf.strings.join([prompt, chosen, rejected], separator=_SEP)
  return tf.strings.to_hash_bucket_fast(joined, 2**62)


class PreferenceSource(instruction_tasks.InstructionSource):
  """Pairs of preference files as a seqio source ('train', 'validation')."""
  KIND = 'preference'
  FORMATS = preferences.FORMATS

  @staticmethod
  def read(files, **options) -> list:
    return preferences.read_pairs_files(files, **options)

  def _dataset_fn(self, split, shuffle_files, seed=None):
    pairs = self.shuffled_examples(split, shuffle_files, seed)
    texts = {k: tf.constant([p[k] for p in pairs], tf.string) for k in ('prompt',) + RESPONSES}
    if pairs and 'margin' in pairs[0]:  # per-pair margins (a reward model's)
      texts['margin'] = tf.constant([p['margin'] for p in pairs], tf.float32)
    return tf.data.Dataset.from_tensor_slices(texts)


@seqio.map_over_dataset
def to_features(x):
  """{'prompt', 'chosen', 'rejected'} -> 'inputs', 'chosen', 'rejected', 'pair_key'
  (and 'margin' as it is, where the pairs have one)."""
  out = {'inputs': x['prompt'], 'chosen': x['chosen'], 'rejected': x['rejected'],
         'pair_key': pair_key(x['prompt'], x['chosen'], x['rejected'])}
  if 'margin' in x:
    out['margin'] = x['margin']
  return out


def trim_and_add_eos(dataset, sequence_length=None, output_features=None):
  """The prompt fitted to 'inputs', each response to 'targets' (EOS included)."""
  lengths = dict(sequence_length or {})
  lengths.update({k: lengths.get('targets') for k in RESPONSES})
  return instruction_tasks.fit_features(dataset, lengths, output_features,
                                        keep_end=('inputs',))


def output_features(gpt: bool = False, vocabulary: Optional[seqio.Vocabulary] = None,
                    bert: bool = False):
  """'inputs', 'chosen', 'rejected' (tokens) and 'pair_key' (int64, passed through);
  `bert`: the WordPiece vocabulary (default) and no EOS."""
  if bert:
    vocabulary = vocabulary or wordpiece.embedded_wordpiece_vocabulary()
    token = seqio.Feature(vocabulary=vocabulary, add_eos=False)
    features = {'inputs': token, 'targets': token}
  else:
    features = instruction_tasks.output_features(gpt, vocabulary)
  return {'inputs': features['inputs'],
          **{k: features['targets'] for k in RESPONSES},
          'pair_key': seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                                    dtype=tf.int64, rank=0)}


def register_preference_task(name: str, paths, format: str = 'pairs',  # pylint: disable=redefined-builtin
                             vocabulary: Optional[seqio.Vocabulary] = None,
                             validation_paths=None, num_validation: int = 0,
                             system_prompt: Optional[str] = None,
                             gpt: Optional[bool] = None,
                             bert: Optional[bool] = None,
                             missing_hint: Optional[str] = None) -> seqio.Task:
  """Registers (or replaces) a preference task over local files.

  Args:
    name: the task name; ending in '_gpt' selects the GPT family's vocabulary
      and prompt format, '_bert' BERT's (WordPiece, no EOS).
    paths: a file, a glob, or a list of them.
    format: one of `t5x_lite.data.preferences.FORMATS`.
    vocabulary: overrides the family's vocabulary.
    validation_paths: files of the 'validation' split.
    num_validation: else the first N pairs of `paths` form 'validation' (and
      are left out of 'train').
    system_prompt: an instruction put before every prompt (Orca-style).
    gpt, bert: override the family chosen by the name.
    missing_hint: what a missing file's error adds (where the files come from).

  Returns:
    The seqio.Task.
  """
  gpt = instruction_tasks.is_gpt(name) if gpt is None else gpt
  bert = name.endswith(BERT_SUFFIX) if bert is None else bert
  source = PreferenceSource(paths, format, validation_paths, num_validation, system_prompt,
                            missing_hint=missing_hint)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[to_features, seqio.preprocessors.tokenize, trim_and_add_eos],
      output_features=output_features(gpt, vocabulary, bert))


def register_shared_samples(directory: Optional[str] = None) -> list:
  """Registers the built-in tasks over `directory` (default `data_dir()`),
  whether or not the files are there (a missing file is one error, when a
  task is used, naming it and DATA_DIR_ENV)."""
  directory = directory or data_dir()
  hint = instruction_tasks.missing_samples_hint(
      directory, DATA_DIR_ENV, 'hh-rlhf/harmless-base/test_first200.jsonl and '
      'llama_factory/dpo_en_demo.json')
  names = []
  for sfx in ('', instruction_tasks.GPT_SUFFIX, BERT_SUFFIX):
    found = [
        register_preference_task(
            'hh_rlhf_harmless_sample' + sfx,
            os.path.join(directory, 'hh-rlhf', 'harmless-base', 'test_first200.jsonl'), 'hh',
            num_validation=20, missing_hint=hint).name,
        register_preference_task(
            'dpo_en_demo' + sfx, os.path.join(directory, 'llama_factory', 'dpo_en_demo.json'),
            'sharegpt', num_validation=30, missing_hint=hint).name,
    ]
    instruction_tasks.register_instruction_mixture('preference_mixture' + sfx, found)
    names += found
  return names


register_shared_samples()
