"""Instruction-tuning tasks and mixtures: local instruction files, Flan-style
GLUE / SuperGLUE instructions, Super-NaturalInstructions (SNI) with held-out
tasks.

Every task has features 'inputs' (the rendered prompt, see
`t5x_lite.data.instructions`) and 'targets' (the response), with their
'*_pretokenized' text. Vocabulary by family: a name ending in '_gpt' uses the
embedded BPE vocabulary and no EOS after the prompt (the response follows it
in one sequence); other names use the embedded 8k SentencePiece vocabulary
(T5) and end the prompt with EOS. A prompt longer than its 'inputs' length
loses its beginning (the instance and the '### Response:' cue are kept); a
response is cut at its end, before the EOS.

Your own files:

    from t5x_lite.tasks import instructions
    instructions.register_instruction_task(
        'my_chat_gpt', '/data/chat/*.jsonl', format='chat', num_validation=200,
        system_prompt='You are a helpful assistant.')
    instructions.register_instruction_mixture(
        'my_mixture_gpt', ['my_chat_gpt', 'alpaca_demo_gpt'], cap=3000)

Built in, over the samples in `data_dir()` ($T5X_LITE_INSTRUCTIONS_DIR, else
../shared/data/instructions next to the repository; always registered, a
missing file being one error naming it and the setting when the task is used;
`register_shared_samples(path)` registers them over another directory), each
also with a '_gpt' twin:

  alpaca_demo                Alpaca JSON (the first 50 records: validation)
  self_instruct_seed         the 175 Self-Instruct seed tasks
  sni_task<N>                one SNI task file each: Definition + 2 positive
                             examples; 'validation' = the first 100 instances,
                             'train' = the rest; metrics ROUGE-L and exact
                             match, best over the instance's outputs
  sni_train_mixture          SNI tasks trained on (SNI_TRAIN_TASKS)
  sni_heldout_mixture        SNI tasks never trained on (SNI_HELDOUT_TASKS),
                             for evaluation of unseen tasks
  instruction_mixture        alpaca_demo + the SNI train tasks + the GLUE
                             instructions below

Always registered (rows from `t5x_lite.data.glue_sources`, TFDS or files):
glue_{sst2,rte,mrpc,qnli,cola}_instruct and
super_glue_{boolq,cb,copa}_instruct: Flan-style natural-language prompts
(three templates per task, chosen by the row's idx), targets the label words
('yes' / 'no', 'positive' / 'negative', COPA: the chosen alternative),
scored with the GLUE task's metrics after mapping the text back to a class.

Mixtures mix by number of training examples, each task's count capped at
`cap` (Flan's examples-proportional mixing; default MIXING_CAP).

System messages (Orca): a run's `system_messages.data_settings` (gin
SYSTEM_MESSAGES = 'orca' in configs/runs/instruct.gin, SYSTEM_MESSAGE in
infer / eval) puts a system message before every prompt that has none of its
own, through the template's system block (see
`t5x_lite.data.system_messages`); it is part of 'inputs', so the WIT loss
weights it as prompt. Sampled messages are drawn by task type: the SNI tasks
are Orca's 'niv2' collection, the others' type is told from each prompt
(`register_instruction_task(..., task_type=...)` fixes it).
"""

import functools
import os
import string
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite import metrics
from t5x_lite.data import glue_sources
from t5x_lite.data import instructions
from t5x_lite.data import sources
from t5x_lite.data import system_messages
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
from t5x_lite.tasks import glue

DATA_DIR_ENV = 'T5X_LITE_INSTRUCTIONS_DIR'
GPT_SUFFIX = '_gpt'
MIXING_CAP = 3000
SNI_NUM_VALIDATION = 100
SNI_TRAIN_TASKS = ('task131', 'task137', 'task138', 'task142')
SNI_HELDOUT_TASKS = ('task140', 'task143', 'task318')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_dir() -> str:
  """Where the built-in samples are read from."""
  return os.environ.get(DATA_DIR_ENV) or os.path.normpath(
      os.path.join(_REPO, '..', 'shared', 'data', 'instructions'))


def is_gpt(name: str) -> bool:
  return name.endswith(GPT_SUFFIX)


def output_features(gpt: bool = False, vocabulary: Optional[seqio.Vocabulary] = None):
  """'inputs' / 'targets'; GPT: BPE vocabulary and no EOS after the prompt."""
  if vocabulary is None:
    vocabulary = vocab_lib.embedded_bpe_vocabulary() if gpt else vocab_lib.embedded_vocabulary()
  return {'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=not gpt),
          'targets': seqio.Feature(vocabulary=vocabulary, add_eos=True)}


# ----------------------------------------------------------------------------
# Preprocessors and postprocessors.


@seqio.map_over_dataset
def to_inputs_targets(x):
  """{'prompt', 'response', 'references', 'system'} -> {'inputs', 'targets',
  'references', 'system'} ('system' is the prompt's own system message, read
  and dropped by `system_messages.add_system_message`)."""
  out = {'inputs': x['prompt'], 'targets': x['response'], 'references': x['references']}
  if 'system' in x:
    out['system'] = x['system']
  return out


def fit_features(dataset, lengths, output_features, keep_end=('inputs',)):
  """Fits each feature of `lengths` to its length, EOS included where the
  feature adds one: those in `keep_end` keep their end, the others their
  start."""
  def fit(x):
    x = dict(x)
    for key, length in lengths.items():
      if key not in x or key not in output_features:
        continue
      eos = output_features[key].add_eos
      ids = x[key]
      if length:
        room = length - int(eos)
        ids = ids[-room:] if key in keep_end else ids[:room]
        if room <= 0:
          ids = ids[:0]
      if eos:
        ids = tf.concat([ids, [output_features[key].vocabulary.eos_id]], 0)
      x[key] = ids
    return x
  return dataset.map(fit, num_parallel_calls=tf.data.AUTOTUNE)


def trim_and_add_eos(dataset, sequence_length=None, output_features=None):
  """Fits 'inputs' (keeping its end) and 'targets' (keeping its start) to their
  lengths, EOS included where the feature adds one."""
  lengths = {k: (sequence_length or {}).get(k) for k in ('inputs', 'targets')}
  return fit_features(dataset, lengths, output_features)


def _text(value) -> str:
  if isinstance(value, (bytes, bytearray)):
    return bytes(value).decode('utf-8', errors='replace')
  return str(value)


def references_postprocessor(output, example=None, is_target=False):
  """Targets: every reference of the example; predictions: the stripped text."""
  if is_target and example is not None and 'references' in example:
    return [_text(r) for r in np.asarray(example['references']).reshape(-1)]
  return _text(output).strip()


def exact_match(targets, predictions):
  """{'exact_match'}: x100, the best over each example's references, after
  SQuAD's normalisation (lowercase, no punctuation or articles)."""
  return {'exact_match': metrics.squad(targets, predictions)['em']}


GENERATION_METRICS = (metrics.rouge_l, exact_match)


# ----------------------------------------------------------------------------
# Instruction files.


class InstructionSource(sources.FunctionSource):
  """Examples of instruction files as a seqio source ('train', 'validation').

  Files are read when a dataset is first built (a bad record is a UserError
  then, never at registration) and again when they change.
  """

  KIND = 'instruction'
  FORMATS = instructions.FORMATS

  def __init__(self, paths, format, validation_paths=None, num_validation=0,  # pylint: disable=redefined-builtin
               system_prompt=None, missing_hint=None, **options):
    if format not in self.FORMATS:
      raise UserError(f'Unknown {self.KIND} format {format!r}; use one of '
                      f'{", ".join(self.FORMATS)}.')
    self._options = dict(format=format, system=system_prompt, **options)
    self._paths = paths
    self._validation_paths = validation_paths
    self._num_validation = num_validation
    self._missing_hint = missing_hint
    self._cache = {}
    splits = ('train', 'validation') if validation_paths or num_validation else ('train',)
    super().__init__(dataset_fn=self._dataset_fn, splits=splits)

  def _files(self, paths) -> list:
    try:
      return instructions.resolve_paths(paths)
    except UserError as e:
      if self._missing_hint:  # a built-in task: say where its files come from
        missing = paths if isinstance(paths, str) else ', '.join(paths)
        raise UserError(f'{missing} is missing; {self._missing_hint}') from None
      raise UserError(str(e)) from None

  @property
  def options(self) -> dict:
    """How rows are read and rendered: 'format', 'system' (the system prompt)
    and the format's own options (such as SNI's num_positive_examples)."""
    return dict(self._options)

  def train_files(self) -> list:
    """The files of the 'train' split (a UserError naming them if missing)."""
    return self._files(self._paths)

  def check_available(self, split=None) -> None:
    """Raises UserError unless the files (of `split`, if given) exist
    (`t5x_lite.data.registry.CheckedSource`)."""
    if self._validation_paths and split == 'validation':
      self._files(self._validation_paths)
    else:
      self._files(self._paths)

  def _read(self, paths):
    files = self._files(paths)
    key = tuple((f, os.path.getmtime(f)) for f in files)
    if key not in self._cache:
      self._cache[key] = self.read(files, **self._options)
    return self._cache[key]

  def examples(self, split: str) -> list:
    """The examples of `split`, in file order."""
    if split not in self.splits:
      raise UserError(f"No '{split}' split here; it has {list(self.splits)} (give "
                      'validation_paths or num_validation for a validation split).')
    if self._validation_paths:
      return self._read(self._paths if split == 'train' else self._validation_paths)
    examples = self._read(self._paths)
    n = self._num_validation
    if split == 'validation':
      return examples[:n]
    if n >= len(examples):
      raise UserError(f'num_validation={n} leaves no training example of {self._paths}; '
                      'lower it.')
    return examples[n:]

  def num_input_examples(self, split: str) -> int:
    return len(self.examples(split))

  @staticmethod
  def read(files, **options) -> list:
    return instructions.read_examples(files, **options)

  def shuffled_examples(self, split: str, shuffle: bool, seed=None) -> list:
    examples = self.examples(split)
    if shuffle:
      rng = np.random.default_rng(sources._shuffle_seed(seed))  # pylint: disable=protected-access
      examples = [examples[i] for i in rng.permutation(len(examples))]
    return examples

  def _dataset_fn(self, split, shuffle_files, seed=None):
    examples = self.shuffled_examples(split, shuffle_files, seed)
    return tf.data.Dataset.from_tensor_slices({
        'prompt': tf.constant([e['prompt'] for e in examples], tf.string),
        'response': tf.constant([e['response'] for e in examples], tf.string),
        'references': tf.ragged.constant([e['references'] for e in examples],
                                         dtype=tf.string),
        'system': tf.constant([e.get('system', '') for e in examples], tf.string),
    }).map(lambda x: dict(x, references=tf.reshape(x['references'], [-1])))


def register_instruction_task(name: str, paths, format: str = 'alpaca',  # pylint: disable=redefined-builtin
                              vocabulary: Optional[seqio.Vocabulary] = None,
                              validation_paths=None, num_validation: int = 0,
                              system_prompt: Optional[str] = None,
                              num_positive_examples: int = 2,
                              metric_fns: Sequence[Callable] = GENERATION_METRICS,
                              gpt: Optional[bool] = None,
                              missing_hint: Optional[str] = None,
                              task_type: Optional[str] = None) -> seqio.Task:
  """Registers (or replaces) an instruction task over local files.

  Args:
    name: the task name; ending in '_gpt' selects the GPT family's vocabulary
      and prompt format (see the module docstring).
    paths: a file, a glob, or a list of them.
    format: one of `t5x_lite.data.instructions.FORMATS`.
    vocabulary: overrides the family's vocabulary.
    validation_paths: files of the 'validation' split.
    num_validation: else the first N examples of `paths` form 'validation'
      (and are left out of 'train').
    system_prompt: an instruction put before every prompt (Orca-style).
    num_positive_examples: demonstrations in SNI prompts.
    metric_fns: seqio metric fns over (references, generated text).
    gpt: overrides the family chosen by the name.
    missing_hint: what a missing file's error adds (where the files come from).
    task_type: the task type the run's sampled system messages are drawn by
      (`t5x_lite.data.system_messages.TASK_TYPES`); None tells it from each
      prompt.

  Returns:
    The seqio.Task.
  """
  gpt = is_gpt(name) if gpt is None else gpt
  source = InstructionSource(paths, format, validation_paths, num_validation,
                             system_prompt, missing_hint=missing_hint,
                             num_positive_examples=num_positive_examples)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[to_inputs_targets, system_messages.with_task_type(task_type),
                     seqio.preprocessors.tokenize, trim_and_add_eos],
      output_features=output_features(gpt, vocabulary),
      postprocess_fn=references_postprocessor,
      metric_fns=list(metric_fns))


# ----------------------------------------------------------------------------
# GLUE / SuperGLUE as instructions (Flan style).

_OPTIONS2 = '\nOPTIONS:\n- {0}\n- {1}'
# (benchmark, config) -> (label words by class id, templates over the row's fields).
GLUE_TEMPLATES = {
    ('glue', 'sst2'): (('negative', 'positive'), (
        '{sentence}\nWhat is the sentiment of this review?' + _OPTIONS2.format('negative', 'positive'),
        'Is the sentiment of the following sentence positive or negative?\n{sentence}',
        'Review: {sentence}\nDid the reviewer like the movie? Answer negative or positive.')),
    ('glue', 'rte'): (('yes', 'no'), (
        '{sentence1}\n\nBased on the paragraph above can we conclude that "{sentence2}"?'
        + _OPTIONS2.format('yes', 'no'),
        '{sentence1}\nDoes this imply that "{sentence2}"? yes or no?',
        'Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the '
        'hypothesis? yes or no?')),
    ('glue', 'mrpc'): (('no', 'yes'), (
        'Do these two sentences mean the same thing?\n{sentence1}\n{sentence2}'
        + _OPTIONS2.format('no', 'yes'),
        'Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAre these two sentences '
        'paraphrases of each other? no or yes?',
        '"{sentence1}" and "{sentence2}"\nDo they say the same thing? no or yes?')),
    ('glue', 'qnli'): (('yes', 'no'), (
        'Does the sentence "{sentence}" answer the question "{question}"?'
        + _OPTIONS2.format('yes', 'no'),
        'Question: {question}\nSentence: {sentence}\nDoes the sentence contain the answer '
        'to the question? yes or no?',
        '{question}\nIs "{sentence}" a correct answer? yes or no?')),
    ('glue', 'cola'): (('no', 'yes'), (
        'Is the following sentence grammatically acceptable?\n{sentence}'
        + _OPTIONS2.format('no', 'yes'),
        'Sentence: "{sentence}"\nWould a linguist rate this sentence as acceptable? no or yes?',
        '{sentence}\nIs this a grammatical English sentence? no or yes?')),
    ('super_glue', 'boolq'): (('no', 'yes'), (
        '{passage}\n\nCan we conclude that {question}?' + _OPTIONS2.format('no', 'yes'),
        'Text: {passage}\n\nQuestion: {question}?\nAnswer no or yes.',
        '{passage}\nBased on the passage, {question}? no or yes?')),
    ('super_glue', 'cb'): (('yes', 'no', 'maybe'), (
        '{premise}\n\nBased on the paragraph above can we conclude that "{hypothesis}"?'
        '\nOPTIONS:\n- yes\n- no\n- maybe',
        'Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the '
        'hypothesis? yes, no, or maybe?',
        '{premise}\nQuestion: Does this imply that "{hypothesis}"? yes, no, or maybe?')),
    ('super_glue', 'copa'): (None, (
        '{premise} What was the {question}?\nOPTIONS:\n- {choice1}\n- {choice2}',
        'Premise: {premise}\nWhat is the {question}?\n- {choice1}\n- {choice2}',
        'Pick the more likely {question} of "{premise}":\n- {choice1}\n- {choice2}')),
}
_GLUE_METRICS = {
    'sst2': [metrics.accuracy], 'rte': [metrics.accuracy],
    'mrpc': [metrics.f1_and_accuracy], 'qnli': [metrics.accuracy],
    'cola': [metrics.matthews_corrcoef], 'boolq': [metrics.accuracy],
    'cb': [metrics.mean_multiclass_f1(num_classes=3), metrics.accuracy],
    'copa': [metrics.accuracy],
}

_PROMPT_HEAD, _PROMPT_TAIL = instructions.render_prompt('\x00').split('\x00')


def _render(template: str, x: Mapping[str, tf.Tensor]) -> tf.Tensor:
  parts = [_PROMPT_HEAD]
  for literal, field, _, _ in string.Formatter().parse(template):
    parts.append(literal)
    if field:
      parts.append(tf.strings.strip(x[field]))
  return tf.strings.join(parts + [_PROMPT_TAIL])


def glue_instruction_text(benchmark: str, config: str):
  """A map over TFDS-shaped rows: template number idx % 3 -> 'inputs',
  the label word -> 'targets' ('<unk>' for unlabelled rows)."""
  words, templates = GLUE_TEMPLATES[benchmark, config]

  @seqio.map_over_dataset
  def fn(x):
    prompts = tf.stack([_render(t, x) for t in templates])
    choice = tf.math.floormod(tf.cast(x['idx'], tf.int32), len(templates))
    label = tf.cast(x['label'], tf.int32)
    if words is None:  # COPA: the chosen alternative
      options = tf.stack(['<unk>', x['choice1'], x['choice2']])
    else:
      options = tf.constant(('<unk>',) + tuple(words))
    out = {'inputs': prompts[choice], 'targets': tf.gather(options, label + 1),
           'idx': x['idx']}
    if words is None:
      out.update(choice1=x['choice1'], choice2=x['choice2'])
    return out

  return fn


def copa_postprocessor(output, example=None, is_target=False):
  """The alternative's text -> 0 / 1 (-1: neither)."""
  del is_target
  text = _text(output).strip()
  if example is not None:
    for i, key in enumerate(('choice1', 'choice2')):
      if text == _text(example[key]).strip():
        return i
  return -1


def _add_glue_instruction(benchmark: str, config: str, gpt: bool) -> str:
  name = f'{benchmark}_{config}_instruct' + (GPT_SUFFIX if gpt else '')
  words, _ = GLUE_TEMPLATES[benchmark, config]
  post = copa_postprocessor if words is None else glue.label_postprocessor(words)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=glue_sources.make_source(benchmark, config, splits=('train', 'validation'),
                                      name=name),
      preprocessors=[glue_instruction_text(benchmark, config),
                     system_messages.with_task_type(None), seqio.preprocessors.tokenize,
                     trim_and_add_eos],
      output_features=output_features(gpt),
      postprocess_fn=post,
      metric_fns=_GLUE_METRICS[config])
  return name


# ----------------------------------------------------------------------------
# Mixtures.


def capped_rate(task: seqio.Task, cap: float = MIXING_CAP) -> float:
  """min(number of training examples, cap): examples-proportional mixing."""
  if 'train' not in task.splits:
    return 0.0
  return float(min(task.num_input_examples('train'), cap))


def register_instruction_mixture(name: str, task_names: Sequence[str],
                                 cap: float = MIXING_CAP) -> seqio.Mixture:
  """Registers (or replaces) a mixture of `task_names` at rates min(n_train, cap)."""
  if cap <= 0:
    raise UserError(f'mixing cap={cap} must be positive.')
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(
      name, [(t, functools.partial(capped_rate, cap=cap)) for t in task_names])


# ----------------------------------------------------------------------------
# Built-in registrations.

GLUE_INSTRUCTION_TASKS = []
for _gpt in (False, True):
  for _benchmark, _config in GLUE_TEMPLATES:
    _name = _add_glue_instruction(_benchmark, _config, _gpt)
    if not _gpt:
      GLUE_INSTRUCTION_TASKS.append(_name)


def _sni_name(path: str) -> str:
  return 'sni_' + os.path.basename(path).split('_')[0]


# The Super-NaturalInstructions task files of the built-in samples.
SNI_FILES = (
    'task131_scan_long_text_generation_action_command_long.json',
    'task137_detoxifying-lms_classification_toxicity.json',
    'task138_detoxifying-lms_classification_fluency.json',
    'task140_detoxifying-lms_classification_style.json',
    'task142_odd-man-out_classification_no_category.json',
    'task143_odd-man-out_classification_generate_category.json',
    'task318_stereoset_classification_gender.json',
)


def missing_samples_hint(directory: str, env: str, contents: str) -> str:
  """The fix a built-in task's missing file names."""
  return (f'the built-in tasks read the samples in {directory}; set {env} to a '
          f'directory holding {contents} (see the README), or register your own files.')


def register_shared_samples(directory: Optional[str] = None) -> list:
  """Registers the built-in tasks and mixtures over `directory` (default
  `data_dir()`) and returns the task names. They are registered whether or not
  the files are there; a missing file is one error, when a task is used,
  naming it and DATA_DIR_ENV. SNI task files in the directory beyond SNI_FILES
  are registered too."""
  directory = directory or data_dir()
  hint = missing_samples_hint(directory, DATA_DIR_ENV,
                              'alpaca/, self_instruct/ and super_natural_instructions/tasks/')
  sni_dir = os.path.join(directory, 'super_natural_instructions', 'tasks')
  sni_files = set(SNI_FILES)
  if os.path.isdir(sni_dir):
    sni_files |= {f for f in os.listdir(sni_dir) if f.endswith('.json')}
  names = []
  for gpt in (False, True):
    sfx = GPT_SUFFIX if gpt else ''
    add = functools.partial(register_instruction_task, gpt=gpt, missing_hint=hint)
    names.append(add('alpaca_demo' + sfx, os.path.join(directory, 'alpaca', 'alpaca_en_demo.json'),
                     'alpaca', num_validation=50).name)
    names.append(add('self_instruct_seed' + sfx,
                     os.path.join(directory, 'self_instruct', 'seed_tasks.jsonl'),
                     'self_instruct', num_validation=25).name)
    sni = {}
    for f in sorted(sni_files):
      task = add(_sni_name(f) + sfx, os.path.join(sni_dir, f), 'sni',
                 num_validation=SNI_NUM_VALIDATION, task_type='niv2')
      sni[_sni_name(f)[len('sni_'):]] = task.name
      names.append(task.name)
    train = [sni[t] for t in SNI_TRAIN_TASKS]
    register_instruction_mixture('sni_train_mixture' + sfx, train)
    register_instruction_mixture('sni_heldout_mixture' + sfx, [sni[t] for t in SNI_HELDOUT_TASKS])
    register_instruction_mixture('instruction_mixture' + sfx,
                                 ['alpaca_demo' + sfx] + train
                                 + [t + sfx for t in GLUE_INSTRUCTION_TASKS])
  return names


register_shared_samples()
