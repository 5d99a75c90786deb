"""Evaluation entry point: a checkpoint on a task's or a mixture's split, scored
the benchmark's way.

    python -m t5x_lite.eval --gin_file=gin/glue_eval.gin --gin.CHECKPOINT_PATH=...

Writes MODEL_DIR/eval/metrics.json (task -> metrics, the GLUE / SuperGLUE
averages) and one `<task>.jsonl` of predictions per task, and prints the table.
SYSTEM_MESSAGE (gin) puts a system message before every instruction prompt
that has none of its own (`t5x_lite.data.system_messages`).
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import seqio

from t5x_lite import evaluation
from t5x_lite import gin_utils
from t5x_lite import runs
from t5x_lite.data import registry
from t5x_lite.data import system_messages
from t5x_lite.partitioning import Partitioner


def evaluate(*,
             model: Any,
             mixture_or_task_name: str,
             task_feature_lengths: Mapping[str, int],
             batch_size: int,
             checkpoint_path: str,
             model_dir: str,
             split: str = 'validation',
             mode: str = 'predict',
             decode: Optional[Mapping[str, Any]] = None,
             num_examples: Optional[int] = None,
             few_shot_k: int = 0,
             seed: int = 0,
             partitioner: Optional[Partitioner] = None,
             vocabulary: Optional[seqio.Vocabulary] = None) -> list[evaluation.TaskResult]:
  """Evaluates `checkpoint_path` on every task of `mixture_or_task_name`; see the module doc."""
  run = runs.Run(model, runs.Data(mixture_or_task_name, task_feature_lengths, batch_size,
                                   split=split, seed=seed, vocabulary=vocabulary), partitioner)
  partitioner = run.partitioner
  evaluator = evaluation.Evaluator(
      model, partitioner, task_feature_lengths, batch_size, split=split, mode=mode,
      decode=decode, num_examples=num_examples, few_shot_k=few_shot_k, seed=seed,
      vocabulary=vocabulary)
  todo = evaluation.eval_tasks(mixture_or_task_name, split)
  system_messages.check_applies(todo)
  if mode == 'rank' and len(todo) > 1:  # a mixture: rank the tasks that have label words
    skipped = [t.name for t in todo if not registry.label_words(t)]
    todo = [t for t in todo if t.name not in skipped]
    if skipped:
      print(f"rank classification skips {', '.join(skipped)} (no fixed label words; "
            "evaluate them with EVAL_MODE = 'predict')")
  params = evaluation.load_params(model, partitioner, checkpoint_path,
                                  evaluator.batch_shapes(todo[0]))
  # The table, a row as each task finishes, then the averages.
  is_main = jax.process_index() == 0
  width = evaluation.table_width([t.name for t in todo])
  results = []
  for task in todo:
    results.append(evaluator.evaluate(params, task))
    if is_main:
      print(evaluation.format_row(task.name, results[-1].metrics, width), flush=True)
  if is_main:
    path = evaluation.write_results(os.path.join(os.path.abspath(model_dir), 'eval'), results,
                                    step=None)
    for line in evaluation.format_averages(results, width):
      print(line)
    print(f'wrote {path}')
  return results


def main(argv: Sequence[str]) -> None:
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  gin_utils.call_configured(evaluate, argv)


if __name__ == '__main__':
  import t5x_lite.eval as eval_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(eval_module.main, 'eval')
