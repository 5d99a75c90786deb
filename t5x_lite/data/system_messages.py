"""System messages put before instruction prompts, fixed or sampled per example.

Orca (Mukherjee et al. 2023, "Orca: Progressive Learning from Complex
Explanation Traces of GPT-4", arXiv:2306.02707) asks its teacher for
explanations by putting one of 16 system messages (its Table 2) before each
query, drawn by the query's collection (its Figure 6). `ORCA` holds those
messages as the paper prints them, typos included ("User will you give you a
task"), numbered 1-16 as in the table; message 1 is empty (no system block).

A named set (`SETS`; `register_set` adds one) maps task types to the ids it
draws from:

  cot, niv2, t0, flan2021          Orca's Figure 6, per FLAN-v2 collection
  flan2021_multiple_choice         Figure 6's Flan2021 multiple-choice queries
  classification                   no message, or a step-by-step one (1, 7, 12)
  multiple_choice                  Flan2021's multiple-choice ones (8, 10)
  generation                       the detailed-answer ones (2, 3, 6)

A task type the set does not list draws from all its messages. `task_type_of`
tells classification, multiple choice and generation apart from a prompt's
text. `sample` is deterministic: the id is picked by the SHA-256 of the seed
and the example's key (its prompt before any system message), so an example
gets the same message in every epoch, on every host, and after a resumed run,
whatever the order the data comes in.

A run chooses through its data settings (`settings.system_messages()`, bound in
gin as `system_messages.data_settings.message` / `.sample_from` / `.seed` /
`.by_task_type`): a fixed `message` (infer / eval's SYSTEM_MESSAGE) wins over
sampling from the set `sample_from` (instruction tuning's SYSTEM_MESSAGES).
`add_system_message` applies it in an instruction task's preprocessors; an
example that carries its own system message (a chat 'system' turn, an Alpaca
row's 'system' field, a task's `system_prompt`) keeps it and gets none.
The text goes through the instruction template's system block
(`instructions.with_system`), so the model reads it as part of the prompt
(weighted λp by the WIT loss; the encoder's input for encoder-decoders).
"""

import dataclasses
import functools
import hashlib
import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from t5x_lite.data import instructions
from t5x_lite.data import settings as settings_lib
from t5x_lite.errors import UserError

# The run's setting, by its name in gin files: system_messages.data_settings.<arg>.
data_settings = settings_lib.system_message_settings

TASK_TYPES = ('classification', 'multiple_choice', 'generation', 'cot', 'niv2', 't0',
              'flan2021', 'flan2021_multiple_choice')


@dataclasses.dataclass(frozen=True)
class MessageSet:
  """Messages numbered from 1, and the ids each task type draws from."""
  name: str
  messages: tuple[str, ...]
  by_task_type: Mapping[str, tuple[int, ...]]

  def ids(self, task_type: Optional[str] = None, by_task_type: bool = True) -> tuple[int, ...]:
    """The ids `task_type` draws from (all of them for an unlisted type)."""
    if by_task_type and task_type in self.by_task_type:
      return self.by_task_type[task_type]
    return tuple(range(1, len(self.messages) + 1))

  def text(self, message_id: int) -> str:
    return self.messages[message_id - 1]


# Orca's Table 2, in its order and wording.
ORCA_MESSAGES = (
    '',
    'You are an AI assistant. Provide a detailed answer so user don’t need to search outside '
    'to understand the answer.',
    'You are an AI assistant. You will be given a task. You must generate a detailed and long '
    'answer.',
    'You are a helpful assistant, who always provide explanation. Think like you are answering '
    'to a five year old.',
    'You are an AI assistant that follows instruction extremely well. Help as much as you can.',
    'You are an AI assistant that helps people find information. Provide a detailed answer so '
    'user don’t need to search outside to understand the answer.',
    'You are an AI assistant. User will you give you a task. Your goal is to complete the task '
    'as faithfully as you can. While performing the task think step-by-step and justify your '
    'steps.',
    'You should describe the task and explain your answer. While answering a multiple choice '
    'question, first output the correct answer(s). Then explain why other answers are wrong. '
    'Think like you are answering to a five year old.',
    'Explain how you used the definition to come up with the answer.',
    'You are an AI assistant. You should describe the task and explain your answer. While '
    'answering a multiple choice question, first output the correct answer(s). Then explain '
    'why other answers are wrong. You might need to use additional knowledge to answer the '
    'question.',
    'You are an AI assistant that helps people find information. User will you give you a '
    'question. Your task is to answer as faithfully as you can. While answering think '
    'step-by-step and justify your answer.',
    'User will you give you a task with some instruction. Your job is follow the instructions '
    'as faithfully as you can. While answering think step-by-step and justify your answer.',
    'You are a teacher. Given a task, you explain in simple steps what the task is asking, any '
    'guidelines it provides and how to use those guidelines to find the answer.',
    'You are an AI assistant, who knows every language and how to translate one language to '
    'another. Given a task, you explain in simple steps what the task is asking, any '
    'guidelines that it provides. You solve the task and show how you used the guidelines to '
    'solve the task.',
    'Given a definition of a task and a sample input, break the definition into small parts. '
    'Each of those parts will have some instruction. Explain their meaning by showing an '
    'example that meets the criteria in the instruction. Use the following format:\n'
    'Part #: a key part of the definition.\n'
    'Usage: Sample response that meets the criteria from the key part. Explain why you think '
    'it meets the criteria.',
    'You are an AI assistant that helps people find information.',
)

ORCA = MessageSet('orca', ORCA_MESSAGES, {
    # Figure 6: the messages of each FLAN-v2 collection.
    'cot': (6, 11, 16),
    'niv2': (1, 2, 5, 7, 9, 12, 13, 14, 15),
    't0': (1, 2, 3, 5, 7),
    'flan2021': (3, 4, 7),
    'flan2021_multiple_choice': (8, 10),
    # The types task_type_of tells from a prompt.
    'classification': (1, 7, 12),
    'multiple_choice': (8, 10),
    'generation': (2, 3, 6),
})

SETS = {'orca': ORCA}


def register_set(name: str, messages: Sequence[str],
                 by_task_type: Optional[Mapping[str, Sequence[int]]] = None) -> MessageSet:
  """Adds (or replaces) a named set; `by_task_type` maps task types to
  1-based ids of `messages`."""
  messages = tuple(messages)
  if not messages or not all(isinstance(m, str) for m in messages):
    raise UserError(f"system message set '{name}' needs a non-empty list of strings.")
  types = {}
  for task_type, ids in (by_task_type or {}).items():
    if task_type not in TASK_TYPES:
      raise UserError(f"system message set '{name}': unknown task type {task_type!r}; use "
                      f"one of {', '.join(TASK_TYPES)}.")
    ids = tuple(ids)
    if not ids or not all(isinstance(i, int) and 1 <= i <= len(messages) for i in ids):
      raise UserError(f"system message set '{name}': task type {task_type!r} needs ids in "
                      f'1..{len(messages)}, got {list(ids)}.')
    types[task_type] = ids
  SETS[name] = MessageSet(name, messages, types)
  return SETS[name]


def get_set(name: str) -> MessageSet:
  if name not in SETS:
    raise UserError(f'unknown system message set {name!r}; use one of {", ".join(sorted(SETS))} '
                    '(or register yours with system_messages.register_set).')
  return SETS[name]


def check_task_type(task_type: Optional[str]) -> None:
  if task_type is not None and task_type not in TASK_TYPES:
    raise UserError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)} "
                    '(or None to tell it from each prompt).')


# ----------------------------------------------------------------------------
# Task types and sampling.

_MULTIPLE_CHOICE = re.compile(
    r'^\s*(options|choices|answer choices)\s*:'   # an options header (Flan's "OPTIONS:")
    r'|^\s*\(?[a-d]\)\s+\S.*\n\s*\(?[b-e]\)\s'     # lettered options: "(A) ...", "B) ..."
    r'|(^\s*-\s+\S.*(\n|$)){2,}\s*\Z',             # a list of 2+ dashed options at the end
    re.IGNORECASE | re.MULTILINE)
_CLASSIFICATION = re.compile(
    r'\b(classify|classification|categori[sz]e|which category|sentiment|true or false|'
    r'yes or no|no or yes|yes, no,? or maybe|positive or negative|negative or positive)\b',
    re.IGNORECASE)


def task_type_of(text: str) -> str:
  """'multiple_choice' (an options header, lettered options, or a dashed list
  of options ending the text), 'classification' (classify, categorise,
  sentiment, yes or no, true or false, ...) or 'generation'. The instruction
  template's '### Response:' cue is left out before the test."""
  text = re.sub(r'\s*### Response:\s*\Z', '', text)
  if _MULTIPLE_CHOICE.search(text):
    return 'multiple_choice'
  if _CLASSIFICATION.search(text):
    return 'classification'
  return 'generation'


def sample_id(key: str, ids: Sequence[int], seed: int = 0) -> int:
  """ids[h mod len(ids)], h the first 8 bytes (big-endian) of SHA-256 of
  '<seed>:<key>' in UTF-8."""
  digest = hashlib.sha256(f'{seed}:{key}'.encode('utf-8')).digest()
  return ids[int.from_bytes(digest[:8], 'big') % len(ids)]


def sample(key: str, task_type: Optional[str] = None, set_name: str = 'orca', seed: int = 0,
           by_task_type: bool = True) -> tuple[int, str]:
  """(id, text) of the message of set `set_name` for the example `key`.

  `task_type` None is told from `key` (`task_type_of`); `by_task_type=False`
  draws from all the set's messages."""
  message_set = get_set(set_name)
  if by_task_type and task_type is None:
    task_type = task_type_of(key)
  message_id = sample_id(key, message_set.ids(task_type, by_task_type), seed)
  return message_id, message_set.text(message_id)


# ----------------------------------------------------------------------------
# The run's choice, applied to prompts.

Chooser = Callable[[str], str]


def chooser(task_type: Optional[str] = None,
            run: Optional[settings_lib.SystemMessageSettings] = None) -> Optional[Chooser]:
  """prompt -> the system message for it, by the run's settings (`run`,
  default `settings.system_messages()`); None when the run puts none."""
  run = run or settings_lib.system_messages()
  if run.message is not None:
    return lambda prompt: run.message
  if run.sample_from is None:
    return None
  get_set(run.sample_from)  # an unknown name fails now, not inside a dataset
  return lambda prompt: sample(prompt, task_type, run.sample_from, run.seed, run.by_task_type)[1]


def apply(prompt: str, own_system: Optional[str] = '', task_type: Optional[str] = None,
          choose: Optional[Chooser] = None) -> str:
  """`prompt` with the run's system message put before it by the template,
  unless the example has its own (`own_system`) or the run puts none.
  `choose` (from `chooser`) saves reading the settings per call."""
  if own_system:
    return prompt
  choose = choose or chooser(task_type)
  return prompt if choose is None else instructions.with_system(prompt, choose(prompt))


def add_system_message(dataset: tf.data.Dataset, task_type: Optional[str] = None
                       ) -> tf.data.Dataset:
  """A seqio preprocessor over text 'inputs' (the rendered prompt): puts the
  run's system message before it (see the module docstring). Reads and drops
  the example's 'system' (its own system message, '' for none) when present."""
  choose = chooser(task_type)
  if choose is None and 'system' not in dataset.element_spec:
    return dataset

  def put(prompt: np.ndarray, own: np.ndarray) -> np.ndarray:
    text = apply(prompt.decode('utf-8'), own.decode('utf-8'), task_type, choose)
    return np.asarray(text.encode('utf-8'), dtype=object)

  def add(x):
    x = dict(x)
    own = x.pop('system', tf.constant(''))
    if choose is not None:
      inputs = tf.numpy_function(put, [x['inputs'], own], tf.string, stateful=False)
      x['inputs'] = tf.ensure_shape(inputs, [])
    return x

  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def _preprocessor(task):
  for p in task.preprocessors:
    if getattr(p, 'func', p) is add_system_message:
      return p
  return None


def puts_system_message(task) -> bool:
  """Whether a seqio task's preprocessors apply the run's system message."""
  return _preprocessor(task) is not None


def task_type_for(task) -> Optional[str]:
  """The task type a task's system messages are drawn by (None: per prompt)."""
  return getattr(_preprocessor(task), 'keywords', {}).get('task_type')


def with_task_type(task_type: Optional[str]) -> Callable:
  """`add_system_message` for tasks of one type (a seqio preprocessor)."""
  check_task_type(task_type)
  return functools.partial(add_system_message, task_type=task_type)


def check_applies(tasks: Sequence, applies: Callable = puts_system_message) -> None:
  """Raises UserError when the run puts a system message and a task of
  `tasks` would not get it (`applies(task)` false): its inputs are not
  instruction prompts."""
  if chooser() is None:
    return
  for task in tasks:
    if not applies(task):
      raise UserError(f"the run's system message (SYSTEM_MESSAGE / SYSTEM_MESSAGES) goes before "
                      f"instruction prompts, and task '{task.name}' has none; set it to None or "
                      'use an instruction task.')
