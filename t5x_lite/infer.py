"""Inference entry point: generations (or predicted labels) as JSONL.

    python -m t5x_lite.infer --gin_file=configs/runs/infer.gin \
        --gin_file=MODEL_DIR/config.gin --gin.CHECKPOINT_PATH="'MODEL_DIR'" \
        [--gin.INPUT_FILE="'prompts.txt'"] [--raw_inputs]

With INPUT_FILE the inputs come from that file alone (the task's dataset is
never read): each line is formatted as the task formats its rows (T5's
'sst2 sentence:' prefix, a classifier's text pair, an instruction template
with its system prompt), or fed as is with `--raw_inputs` (gin RAW_INPUTS);
see `t5x_lite.infer_inputs` for the file format. Otherwise the inputs are the
task's split. SYSTEM_MESSAGE (gin) puts a system message before every
instruction prompt that has none of its own, through the instruction template
(`t5x_lite.data.system_messages`); a task whose inputs are not instruction
prompts, or `--raw_inputs`, refuses it. Each output line is {"inputs" (the
text the model reads), "outputs" (generated text: a continuation for a
language model; a classifier's label word), "score"}, plus "line" (the file's
line number) or "targets" (a split's), in input order, written to
MODEL_DIR/infer/<name>.jsonl.
A reward model (`SCORES_RESPONSES`) reads INPUT_FILE lines {"prompt",
"response"} and writes {"line", "inputs" (the prompt it read), "targets" (the
response), "outputs" and "score" (both the reward)}.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import seqio

from t5x_lite import evaluation
from t5x_lite import gin_utils
from t5x_lite import infer_inputs
from t5x_lite import runs
from t5x_lite.data import pipeline
from t5x_lite.data import registry
from t5x_lite.data import system_messages
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner


def _file_task(mixture_or_task_name: str,
               vocabulary: Optional[seqio.Vocabulary]) -> seqio.Task:
  """The task whose format INPUT_FILE's lines take (a mixture's first task; a
  preference task as prompt -> chosen response, what its DPO run tuned; a
  prompt task as prompt -> response, what its RL run tuned)."""
  tasks = registry.tasks_of(mixture_or_task_name)
  if len(tasks) > 1:
    print(f"{mixture_or_task_name} is a mixture: INPUT_FILE is read as its first task, "
          f"{tasks[0].name} (set MIXTURE_OR_TASK_NAME to pick another)")
  task = pipeline.with_vocabulary(tasks[0], vocabulary)
  features = task.output_features
  if 'chosen' in features and 'targets' not in features:
    task = task.replace(output_features={'inputs': features['inputs'],
                                         'targets': features['chosen']})
  elif set(features) == {'inputs'}:  # prompts only (an RL task): prompt -> response
    task = task.replace(output_features={'inputs': features['inputs'], 'targets': seqio.Feature(
        features['inputs'].vocabulary, add_eos=True)})
  return task


def _check_head(model: Any, task: seqio.Task) -> str:
  """The task's kind (`infer_inputs.kind`), once it is known to suit the model;
  'reward' for a model that scores (prompt, response) pairs."""
  how = infer_inputs.kind(task)
  if model.SCORES_RESPONSES:
    if how != 'text_to_text':
      raise UserError(f'{type(model).__name__} scores a prompt and a response; task '
                      f"'{task.name}' has no such pair: set MIXTURE_OR_TASK_NAME to the "
                      'preference task it was trained on (its config.gin).')
    return 'reward'
  if (how == 'classification') == bool(model.GENERATES):
    want = 'a classifier (a _cls task)' if how == 'classification' else 'a generating model'
    raise UserError(f"task '{task.name}' needs {want}, and the model is "
                    f'{type(model).__name__}; set MIXTURE_OR_TASK_NAME to the task the '
                    'checkpoint was trained on (its config.gin).')
  return how


def _predict_lines(evaluator: evaluation.Evaluator, params: Any, task: seqio.Task, how: str,
                   lines: Sequence[infer_inputs.Line],
                   groups: Sequence[Sequence[dict]]) -> list[dict]:
  """One output row per line, from its examples `groups` (see the module doc)."""
  flat = [ex for group in groups for ex in group]
  if how == 'reward':  # one example per line: its reward
    rewards = evaluator.score_examples(params, task, flat)
    return [{'line': line.lineno, 'inputs': ex['inputs_pretokenized'],
             'targets': ex['targets_pretokenized'], 'outputs': reward, 'score': reward}
            for line, ex, reward in zip(lines, flat, rewards)]
  if how == 'lm':
    outputs = evaluator.continue_prompts(params, [ex['inputs'] for ex in flat],
                                         task.output_features['targets'].vocabulary)
  else:
    outputs = evaluator.predict_examples(params, task, flat)
  rows, start = [], 0
  for line, group in zip(lines, groups):
    mine = outputs[start:start + len(group)]
    start += len(group)
    output, score = (infer_inputs.label_word(task, group, mine) if how == 'classification'
                     else mine[0])
    inputs = [infer_inputs.text(ex['inputs_pretokenized']) for ex in group]
    rows.append({'line': line.lineno, 'inputs': inputs[0] if len(inputs) == 1 else inputs,
                 'outputs': output, 'score': score})
  return rows


def infer(*,
          model: Any,
          mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int],
          batch_size: int,
          checkpoint_path: str,
          model_dir: str,
          input_file: Optional[str] = None,
          raw_inputs: bool = False,
          split: str = 'validation',
          decode: Optional[Mapping[str, Any]] = None,
          num_examples: Optional[int] = None,
          seed: int = 0,
          partitioner: Optional[Partitioner] = None,
          vocabulary: Optional[seqio.Vocabulary] = None) -> str:
  """Writes predictions for a task split or INPUT_FILE; returns the JSONL path.

  With `input_file` nothing of the task's dataset is read: the model's shapes
  come from the feature lengths, the inputs from the file (`raw_inputs`: the
  lines as they are).
  """
  if not input_file and model.SCORES_RESPONSES:
    raise UserError(f'{type(model).__name__} scores responses; give INPUT_FILE, a .jsonl of '
                    '{"prompt": ..., "response": ...} (one reward per line).')
  run = runs.Run(model, runs.Data(mixture_or_task_name, task_feature_lengths, batch_size,
                                   split=split, seed=seed, vocabulary=vocabulary),
                 partitioner, check_data=not input_file)
  partitioner = run.partitioner
  evaluator = evaluation.Evaluator(
      model, partitioner, task_feature_lengths, batch_size, split=split, decode=decode,
      num_examples=num_examples, seed=seed, vocabulary=vocabulary)
  if input_file:
    task = _file_task(mixture_or_task_name, vocabulary)
    missing = sorted(set(task.output_features) - set(task_feature_lengths))
    if missing and infer_inputs.kind(task) != 'classification':
      raise UserError(f'TASK_FEATURE_LENGTHS has no length for {missing} of '
                      f"'{task.name}'; set it, e.g. {{..., 'targets': 64}} (the longest "
                      'response).')
    runs.check_vocab(model, pipeline.output_vocab_size(task))
    how = _check_head(model, task)
    if raw_inputs and system_messages.chooser() is not None:
      raise UserError('SYSTEM_MESSAGE is not put before --raw_inputs lines (each is the model '
                      'input as it is); write it into the lines, or drop --raw_inputs.')
    system_messages.check_applies(
        [task], lambda t: how == 'text_to_text' and infer_inputs.takes_system_message(t))
    lines = infer_inputs.read(input_file, raw_inputs)  # the file's mistakes before the load
    examples = infer_inputs.response_examples if how == 'reward' else infer_inputs.examples
    groups = examples(task, lines, evaluator.lengths, input_file, raw_inputs)
    shapes = runs.converter_batch_shapes(model, task_feature_lengths, batch_size, pack=False)
    params = evaluation.load_params(model, partitioner, checkpoint_path, shapes)
    rows = _predict_lines(evaluator, params, task, how, lines, groups)
    name = os.path.splitext(os.path.basename(input_file))[0]
  else:
    task = run.task
    if not isinstance(task, seqio.Task):
      task = evaluation.eval_tasks(mixture_or_task_name, split)[0]
    system_messages.check_applies([task])
    params = evaluation.load_params(model, partitioner, checkpoint_path,
                                    evaluator.batch_shapes(task))
    rows = [{'inputs': r['inputs'], 'targets': r['target'], 'outputs': r['prediction'],
             'score': r['score']} for r in evaluator.evaluate(params, task).rows]
    name = f'{task.name}-{split}'
  path = os.path.join(os.path.abspath(model_dir), 'infer', f'{name}.jsonl')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
    print(f'wrote {len(rows)} predictions to {path}')
  return path


def main(argv: Sequence[str]) -> None:
  """`--raw_inputs` is gin's RAW_INPUTS = True; the other arguments are gin's."""
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  argv = list(argv)
  if '--raw_inputs' in argv:
    argv = [a for a in argv if a != '--raw_inputs'] + ['--gin.RAW_INPUTS=True']
  gin_utils.call_configured(infer, argv)


if __name__ == '__main__':
  import t5x_lite.infer as infer_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(infer_module.main, 'infer')
