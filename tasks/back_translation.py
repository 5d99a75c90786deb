"""Tasks of instruction back-translation (Humpback, Li et al. 2023; the
generator is `t5x_lite.back_translate`).

Backward tasks reverse an instruction task: the model reads the source's
response and learns to write its instruction, p(instruction | output).
'inputs' is the response rendered as the input of a fixed instruction
(`t5x_lite.data.back_translation.BACKWARD_INSTRUCTION`, through
`render_prompt`); 'targets' is the source prompt's last instruction with its
'### Input:' block if it has one (`back_translation.instruction_block`),
without any system prompt or earlier turns. Features, vocabulary, splits and
metrics are the source's (a '_gpt' source gives a GPT task).

Built in, over the shared Alpaca demo (`alpaca_demo`, its first 50 records
the validation split):

  alpaca_demo_backward       T5 vocabulary, EOS after the prompt
  alpaca_demo_backward_gpt   GPT: BPE vocabulary, one causal sequence

Train one with an instruction gin:

    python -m t5x_lite.train --gin_file=gin/gpt_instruct_wit.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'alpaca_demo_backward_gpt'"

The next iteration's data (seed + curated pairs), in a module your gin imports:

    from t5x_lite.tasks import back_translation
    back_translation.register_iteration_mixture(
        'humpback_m1_gpt', 'runs/gpt_tiny_back_translate/back_translation.jsonl')
"""

from typing import Optional

import seqio
import tensorflow as tf

from t5x_lite.data import back_translation as data
from t5x_lite.errors import UserError
from t5x_lite.tasks import instructions as instruction_tasks

BACKWARD_SUFFIX = '_backward'
CURATED_SUFFIX = '_curated'

# The backward prompt around the (stripped) response.
_HEAD, _TAIL = data.backward_prompt('\x00').split('\x00')
# What `render_prompt` puts before an instruction and after the last block.
_INSTRUCTION_HEADER = '### Instruction:\n'
_RESPONSE_CUE = '### Response:\n'


def backward_name(source_task_name: str) -> str:
  """'alpaca_demo' -> 'alpaca_demo_backward'; 'x_gpt' -> 'x_backward_gpt'."""
  sfx = instruction_tasks.GPT_SUFFIX if instruction_tasks.is_gpt(source_task_name) else ''
  return source_task_name[:len(source_task_name) - len(sfx)] + BACKWARD_SUFFIX + sfx


@seqio.map_over_dataset
def swap_to_backward(x):
  """{'inputs': rendered prompt, 'targets': response} -> the backward pair."""
  prompt = tf.strings.regex_replace(x['inputs'], r'(?s)\A.*' + _INSTRUCTION_HEADER, '')
  prompt = tf.strings.regex_replace(prompt, r'(?s)\s*' + _RESPONSE_CUE + r'\z', '')
  block = tf.strings.strip(prompt)
  backward = tf.strings.join([_HEAD, tf.strings.strip(x['targets']), _TAIL])
  return {'inputs': backward, 'targets': block, 'references': tf.reshape(block, [1])}


def register_backward_task(name: str, source_task_name: str) -> seqio.Task:
  """Registers (or replaces) `name`: `source_task_name` with inputs and targets
  swapped (see the module docstring).

  The source must be a registered task whose text preprocessing ends in
  'inputs' (a rendered prompt) and 'targets' before it is tokenized with
  `seqio.preprocessors.tokenize`, as every instruction task's does.
  """
  try:
    source = seqio.TaskRegistry.get(source_task_name)
  except (ValueError, KeyError):
    raise UserError(f'No task named {source_task_name!r} to reverse; register it first '
                    '(t5x_lite.tasks.instructions.register_instruction_task).') from None
  if not {'inputs', 'targets'} <= set(source.output_features):
    raise UserError(f'{source_task_name} has no inputs / targets features to swap; '
                    'reverse an instruction task.')
  steps = list(source.preprocessors)
  if seqio.preprocessors.tokenize not in steps:
    raise UserError(f'{source_task_name} is not tokenized by seqio.preprocessors.tokenize, '
                    'so its text cannot be swapped; reverse an instruction task.')
  cut = steps.index(seqio.preprocessors.tokenize)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source.source,
      preprocessors=steps[:cut] + [swap_to_backward] + steps[cut:],
      output_features=source.output_features,
      postprocess_fn=instruction_tasks.references_postprocessor,
      metric_fns=list(instruction_tasks.GENERATION_METRICS))


def register_iteration_mixture(name: str, curated_paths, seed_task: Optional[str] = None,
                               cap: float = float('inf')) -> seqio.Mixture:
  """Registers the next model's training data: `seed_task` + the curated pairs.

  Args:
    name: the mixture name; ending in '_gpt' gives GPT tasks.
    curated_paths: back_translation.jsonl files (Alpaca rows) of the kept pairs;
      registered as the task `<name without _gpt>_curated[_gpt]`.
    seed_task: the seed instruction task (default 'alpaca_demo', '_gpt' twin for
      a GPT name).
    cap: each task's rate is min(number of examples, cap); the default mixes by
      example count, as if the two were one set.

  Returns:
    The seqio.Mixture.
  """
  gpt = instruction_tasks.is_gpt(name)
  sfx = instruction_tasks.GPT_SUFFIX if gpt else ''
  curated = name[:len(name) - len(sfx)] + CURATED_SUFFIX + sfx
  instruction_tasks.register_instruction_task(curated, curated_paths, 'alpaca', gpt=gpt)
  seed_task = seed_task or 'alpaca_demo' + sfx
  return instruction_tasks.register_instruction_mixture(name, [seed_task, curated], cap=cap)


def register_shared_backward_tasks() -> list:
  """Registers the built-in backward tasks (over the current `alpaca_demo` tasks)."""
  return [register_backward_task(backward_name(source), source).name
          for source in ('alpaca_demo', 'alpaca_demo' + instruction_tasks.GPT_SUFFIX)]


register_shared_backward_tasks()
