"""Inference entry point: generations (or predicted labels) as JSONL.

    python -m t5x_lite.infer --gin_file=gin/t5_tiny_infer.gin --gin.CHECKPOINT_PATH=... \
        [--gin.INPUT_FILE=prompts.txt]

With INPUT_FILE (one input text per line) the inputs come from that file,
tokenised with the task's input vocabulary; otherwise from the task's split.
Each output line is {"inputs", "outputs", "score"} (plus "targets" for a task
split), in input order, written to MODEL_DIR/infer/<name>.jsonl.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from t5x_lite import evaluation
from t5x_lite import gin_utils
from t5x_lite import runs
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner


def _read_inputs(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise UserError(f'INPUT_FILE {path} does not exist; give a text file with one input per line.')
  with open(path, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  lines = [line for line in lines if line.strip()]
  if not lines:
    raise UserError(f'INPUT_FILE {path} has no non-empty line.')
  return lines


def infer(*,
          model: Any,
          mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int],
          batch_size: int,
          checkpoint_path: str,
          model_dir: str,
          input_file: Optional[str] = None,
          split: str = 'validation',
          decode: Optional[Mapping[str, Any]] = None,
          num_examples: Optional[int] = None,
          seed: int = 0,
          partitioner: Optional[Partitioner] = None,
          vocabulary: Optional[seqio.Vocabulary] = None) -> str:
  """Writes predictions for a task split or INPUT_FILE; returns the JSONL path."""
  run = runs.Run(model, runs.Data(mixture_or_task_name, task_feature_lengths, batch_size,
                                   split=split, seed=seed, vocabulary=vocabulary),
                 partitioner, check_data=not input_file)
  partitioner = run.partitioner
  evaluator = evaluation.Evaluator(
      model, partitioner, task_feature_lengths, batch_size, split=split, decode=decode,
      num_examples=num_examples, seed=seed, vocabulary=vocabulary)
  task = run.task
  if not isinstance(task, seqio.Task):
    task = evaluation.eval_tasks(mixture_or_task_name, split)[0]
  params = evaluation.load_params(model, partitioner, checkpoint_path,
                                  evaluator.batch_shapes(task))
  if input_file:
    vocab = task.output_features['inputs'].vocabulary
    texts = _read_inputs(input_file)
    limit = task_feature_lengths['inputs'] - 1
    examples = [{'inputs': np.asarray(vocab.encode(t)[:limit] + [vocab.eos_id], np.int32),
                 'inputs_pretokenized': t} for t in texts]
    outputs = evaluator.predict_examples(params, task, examples)
    rows = [{'inputs': t, 'outputs': o, 'score': s} for t, (o, s) in zip(texts, outputs)]
    name = os.path.splitext(os.path.basename(input_file))[0]
  else:
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
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  gin_utils.call_configured(infer, argv)


if __name__ == '__main__':
  import t5x_lite.infer as infer_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(infer_module.main, 'infer')
