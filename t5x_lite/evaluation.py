"""Evaluates a model on seqio tasks the way each benchmark scores itself.

For every task (a mixture is evaluated task by task) the split is read in
order, fed to the model in padded batches, and the model's outputs are turned
back into the task's label space by the task's own postprocessor before its
metric functions (seqio's `fn(targets, predictions)`) see them:

  mode='predict'  text-to-text models (T5, GPT, BART) generate with
                  `model.predict_batch` (greedy, beam or sampling; see
                  `t5x_lite.decoding`), classification models (the `_cls`
                  tasks) predict a label. A prediction that the postprocessor
                  turns into a dict (grouped tasks) also carries the model's
                  'score' (sequence log-prob, or log p(class 1)), so that a
                  metric can rank a group's candidates (COPA, ReCoRD).
  mode='rank'     rank classification: every candidate label word of the task
                  (task metadata, `registry.label_words`) is scored with
                  `model.score` and the best one is the prediction. With
                  `few_shot_k > 0`, k demonstrations drawn from the train
                  split (seeded, per example) are prepended to each input, as
                  GPT-3 evaluated.

Targets are the postprocessed `targets_pretokenized` (text-to-text) or `label`
(classification) of each example.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite import lora
from t5x_lite.data import pipeline
from t5x_lite.data import registry
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner


@dataclasses.dataclass
class TaskResult:
  """One task's metrics and its per-example rows (inputs, target, prediction, score)."""
  task: str
  metrics: dict[str, float]
  rows: list[dict]


def eval_tasks(mixture_or_task_name: str, split: str) -> list[seqio.Task]:
  """The tasks to evaluate: a task itself, or a mixture's tasks that have metrics."""
  task = pipeline.get_task_or_mixture(mixture_or_task_name)
  subtasks = [task] if isinstance(task, seqio.Task) else seqio.get_subtasks(task)
  found = [t for t in subtasks if t.predict_metric_fns and split in t.splits]
  if not found:
    raise UserError(f"'{mixture_or_task_name}' has no task with metrics and a '{split}' split; "
                    'evaluate a GLUE / SuperGLUE task or mixture, or set the split.')
  return found


def _text(x: Any) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def _is_text_to_text(task: seqio.Task) -> bool:
  return 'targets' in task.output_features


def _pad_rows(features: dict[str, np.ndarray], batch_size: int):
  """Batches of `batch_size` rows; the last one padded with copies of row 0."""
  n = len(next(iter(features.values())))
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in features.items()}
    short = batch_size - len(next(iter(batch.values())))
    if short:
      batch = {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)]) for k, v in batch.items()}
    yield batch, batch_size - short


class Evaluator:
  """Jitted prediction / scoring of one model, reused across tasks and steps.

  Args:
    model: a Model wrapper (text-to-text: `predict_batch` and `score`;
      classification: `predict_batch`).
    partitioner: the mesh and rules (params come already sharded).
    task_feature_lengths: 'inputs' / 'targets' lengths (targets bound the
      decode length).
    batch_size: global eval batch size.
    mode: 'predict' or 'rank' (see the module docstring).
    decode: keyword arguments of `predict_batch` (method, num_beams, alpha,
      temperature, top_k, top_p).
    num_examples: evaluate only the first N examples of each task (None: all).
    few_shot_k: demonstrations per example in 'rank' mode.
  """

  def __init__(self,
               model: Any,
               partitioner: Partitioner,
               task_feature_lengths: Mapping[str, int],
               batch_size: int,
               *,
               split: str = 'validation',
               mode: str = 'predict',
               decode: Optional[Mapping[str, Any]] = None,
               num_examples: Optional[int] = None,
               few_shot_k: int = 0,
               seed: int = 0,
               vocabulary: Optional[seqio.Vocabulary] = None):
    if mode not in ('predict', 'rank'):
      raise UserError(f"eval mode={mode!r} is unknown; use 'predict' or 'rank'.")
    if few_shot_k and mode != 'rank':
      raise UserError("few_shot_k needs mode='rank' (few-shot evaluation scores candidates).")
    partitioner.check_batch_size(batch_size)
    self.model = model
    self.partitioner = partitioner
    self.lengths = dict(task_feature_lengths)
    self.batch_size = batch_size
    self.split = split
    self.mode = mode
    self.decode = dict(decode or {})
    self.num_examples = num_examples
    self.few_shot_k = few_shot_k
    self.seed = seed
    self.vocabulary = vocabulary
    self._pools = {}  # task name -> its train examples (few-shot demonstrations)
    self.decoder_only = model.DECODER_ONLY
    generate = lambda p, b: model.predict_batch(
        p, b, jax.random.PRNGKey(seed), max_decode_length=self.lengths.get('targets'),
        **self.decode)
    out = partitioner.replicated  # every host reads the whole output
    self._score = jax.jit(model.score, out_shardings=out)
    self._generate = jax.jit(generate, out_shardings=out)  # text-to-text tasks
    self._classify = jax.jit(functools.partial(_classify, model), out_shardings=out)  # _cls

  # --- data -------------------------------------------------------------

  def _task(self, task: seqio.Task) -> seqio.Task:
    return pipeline.with_vocabulary(task, self.vocabulary)

  def _examples(self, task: seqio.Task, split: str) -> list[dict]:
    limit = self.num_examples if split == self.split else None
    ds = task.get_dataset(self.lengths, split=split, shuffle=False, num_epochs=1,
                          use_cached=False, try_in_mem_cache=limit is None)
    if limit is not None:
      ds = ds.take(limit)
    return list(ds.as_numpy_iterator())

  def _convert(self, task: seqio.Task, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """The model's features for `examples` (in order, unpacked) as [N, ...] arrays."""
    keys = [k for k in task.output_features if k in examples[0]]
    signature = {k: tf.TensorSpec([None], tf.int32) for k in keys}
    extra = {}
    if not _is_text_to_text(task):  # classification: the label rides along
      label = np.asarray(examples[0]['label'])
      extra['label'] = tf.TensorSpec(label.shape, tf.as_dtype(label.dtype))
    gen = lambda: ({**{k: np.asarray(ex[k], np.int32) for k in keys},
                    **{k: ex[k] for k in extra}} for ex in examples)
    ds = tf.data.Dataset.from_generator(gen, output_signature={**signature, **extra})
    lengths = {k: v for k, v in self.lengths.items() if k in keys or not _is_text_to_text(task)}
    ds = self.model.FEATURE_CONVERTER_CLS(pack=False)(ds, lengths)
    rows = list(ds.as_numpy_iterator())
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def _prompt(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What generation may see: the encoder inputs, or a decoder-only model's prompt."""
    if self.decoder_only and 'decoder_prompt_mask' in features:  # causal prompt (WIT)
      prompt = features['decoder_prompt_mask']
      return {'decoder_input_tokens': features['decoder_input_tokens'] * prompt,
              'decoder_prompt_lengths': prompt.sum(axis=1) - 1}
    if self.decoder_only:
      prompt = features['decoder_causal_attention'] if 'decoder_causal_attention' in features \
          else np.zeros_like(features['decoder_input_tokens'])
      return {'decoder_input_tokens': features['decoder_input_tokens'] * prompt,
              'decoder_causal_attention': prompt}
    return {'encoder_input_tokens': features['encoder_input_tokens']}

  def _run(self, fn, params, features: dict[str, np.ndarray]):
    """`fn` over all rows in padded global batches; outputs concatenated on the host."""
    outs = []
    for batch, real in _pad_rows(features, self.batch_size):
      with self.partitioner.activate():
        out = jax.device_get(fn(params, self.partitioner.shard_batch(self._local(batch))))
      outs.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[:real], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)

  def _local(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This host's rows of a global batch (every host holds the whole batch)."""
    n = jax.process_count()
    if n == 1:
      return batch
    per = self.batch_size // n
    i = jax.process_index()
    return {k: v[i * per:(i + 1) * per] for k, v in batch.items()}

  # --- modes ------------------------------------------------------------

  def predict_examples(self, params, task: seqio.Task,
                       examples: Sequence[dict]) -> list[tuple[Any, Optional[float]]]:
    """(output before postprocessing, score) per example: generated text for
    text-to-text models (examples need only 'inputs'), a label otherwise."""
    if _is_text_to_text(task) and 'targets' not in examples[0]:
      examples = [dict(ex, targets=np.zeros([0], np.int32)) for ex in examples]
    features = self._convert(task, examples)
    if not _is_text_to_text(task):
      labels, scores = self._run(self._classify, params, features)
      return list(zip(labels.tolist(), scores.tolist()))
    tokens, scores = self._run(self._generate, params, self._prompt(features))
    vocab = task.output_features['targets'].vocabulary
    texts = [vocab.decode(_until_eos(t, vocab.eos_id)) for t in tokens.tolist()]
    return list(zip(texts, scores.tolist()))

  def score_examples(self, params, task: seqio.Task, examples: Sequence[dict]) -> list[float]:
    """The model's `score` of each (inputs, targets) example (a reward model's reward)."""
    return self._run(self._score, params, self._convert(task, examples)).tolist()

  def continue_prompts(self, params, prompts: Sequence[np.ndarray],
                       vocab: seqio.Vocabulary) -> list[tuple[str, float]]:
    """(continuation, score) of a decoder-only language model per prompt (ids,
    no EOS): causal attention over the prompt, as the model was trained; a
    prompt longer than the 'targets' length keeps its end."""
    length = self.lengths['targets']
    tokens = np.zeros([len(prompts), length], np.int32)  # BOS 0, the prompt, then 0s
    lengths = np.zeros([len(prompts)], np.int32)
    for i, ids in enumerate(prompts):
      ids = list(ids)[-(length - 1):]
      tokens[i, 1:1 + len(ids)] = ids
      lengths[i] = len(ids)
    features = {'decoder_input_tokens': tokens, 'decoder_prompt_lengths': lengths}
    out, scores = self._run(self._generate, params, features)
    texts = [vocab.decode(_until_eos(t, vocab.eos_id)) for t in out.tolist()]
    return list(zip(texts, scores.tolist()))

  def _rank(self, params, task, examples):
    """Rank classification: the best-scoring label word per example."""
    words = registry.label_words(task)
    if not words:
      raise UserError(f"task '{task.name}' has no candidate label words; evaluate it with "
                      "mode='predict'.")
    vocab = task.output_features['inputs'].vocabulary
    eos = [vocab.eos_id]
    inputs = [list(ex['inputs']) for ex in examples]
    if self.few_shot_k:
      inputs = self._with_demonstrations(task, examples, vocab)
    candidates = [vocab.encode(w) + eos for w in words]
    rows = [{'inputs': np.asarray(x, np.int32), 'targets': np.asarray(c, np.int32)}
            for x in inputs for c in candidates]
    scores = self._run(self._score, params, self._convert(task, rows)).reshape(
        len(examples), len(words))
    best = scores.argmax(-1)
    return [(words[b], float(s[b])) for b, s in zip(best, scores)]

  def _with_demonstrations(self, task, examples, vocab) -> list[list[int]]:
    """Each input prefixed by k train demonstrations ('inputs targets' lines)."""
    if task.name not in self._pools:
      self._pools[task.name] = self._examples(task, 'train')
    pool = self._pools[task.name]
    if len(pool) < self.few_shot_k:
      raise UserError(f"few_shot_k={self.few_shot_k} but '{task.name}' has only {len(pool)} "
                      'training examples; lower few_shot_k.')
    limit = self.lengths['inputs'] - 1
    out = []
    for i, ex in enumerate(examples):
      rng = np.random.default_rng([self.seed, i])
      demos = [pool[j] for j in rng.choice(len(pool), self.few_shot_k, replace=False)]
      text = ''.join(f"{_text(d['inputs_pretokenized'])} {_text(d['targets_pretokenized'])}\n"
                     for d in demos) + _text(ex['inputs_pretokenized'])
      ids = vocab.encode(text)
      out.append(ids[-limit:] + [vocab.eos_id])  # keep the query: cut the oldest demos
    return out

  # --- public -----------------------------------------------------------

  def batch_shapes(self, task: seqio.Task) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's feature shapes for `task` (for the model's init)."""
    task = self._task(task)
    features = self._convert(task, self._examples(task, self.split)[:1])
    return {k: jax.ShapeDtypeStruct((self.batch_size,) + v.shape[1:], v.dtype)
            for k, v in features.items()}

  def evaluate(self, params, task: seqio.Task) -> TaskResult:
    """Metrics (the task's metric fns) and per-example rows for one task."""
    task = self._task(task)
    examples = self._examples(task, self.split)
    if not examples:
      raise UserError(f"task '{task.name}' split '{self.split}' is empty.")
    text_to_text = _is_text_to_text(task)
    if self.mode == 'rank':
      if not text_to_text:
        raise UserError("mode='rank' needs a text-to-text task; classification (_cls) tasks "
                        "use mode='predict'.")
      outputs = self._rank(params, task, examples)
    else:
      outputs = self.predict_examples(params, task, examples)
    post = task.postprocess_fn or (lambda x, **_: x)
    targets, predictions, rows = [], [], []
    for ex, (output, score) in zip(examples, outputs):
      target = _text(ex['targets_pretokenized']) if text_to_text else ex['label'].item()
      targets.append(post(target, example=ex, is_target=True))
      prediction = post(output, example=ex, is_target=False)
      if isinstance(prediction, dict) and score is not None:  # grouped: metrics may rank
        prediction = dict(prediction, score=score)
      predictions.append(prediction)
      rows.append({'inputs': _input_text(ex), 'target': _jsonable(target),
                   'prediction': _jsonable(output), 'score': score})
    metrics = {}
    for fn in task.predict_metric_fns:
      metrics.update({k: float(v) for k, v in fn(targets, predictions).items()})
    return TaskResult(task.name, metrics, rows)


def load_params(model: Any, partitioner: Partitioner, checkpoint_path: str,
                batch_shapes: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
  """A checkpoint's params, restored straight into the model's shardings, as
  the model's `logits` / `score` / `predict_batch` take them. A LoRA run's
  checkpoint (adapters only) gives the base its meta names with the adapters
  attached (`lora.attach`), which the family's model (a run's MODEL) and the
  LoraModel around it both read."""
  from t5x_lite import checkpoints  # pylint: disable=g-import-not-at-top
  from t5x_lite import trainer  # pylint: disable=g-import-not-at-top
  step_dir = checkpoints.resolve_step_dir(checkpoint_path)
  base = checkpoints.read_meta(step_dir).get(lora.CHECKPOINT_META)
  if base is None and model.base_model is not None:
    raise UserError(f'{step_dir} names no base checkpoint for LoRA adapters; evaluate a '
                    'checkpoint written by a LoRA run (configs/lora.gin).')
  if base is not None and model.base_model is None:
    model = lora.LoraModel(model, lora.LoraConfig(**base['config']))
  abstract, shardings = trainer.abstract_params(model, partitioner, dict(batch_shapes))
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  params = checkpoints.restore_params(step_dir, abstract)
  with partitioner.activate():
    params = jax.device_put(params, shardings)
  if base is None:
    return params
  frozen = {'base': trainer.base_params(model.base_model, partitioner, dict(batch_shapes),
                                        base['seed'], base['checkpoint'],
                                        fresh=model.FRESH_PARAMS)}
  return model.inference_params(params, frozen)


def _classify(model: Any, params, batch) -> tuple[jax.Array, jax.Array]:
  """A classification model's [B] labels and [B] scores: log p(last class)
  (class 1 of a binary task), or the regression value."""
  from t5x_lite.models import classification  # pylint: disable=g-import-not-at-top
  logits = model.logits(params, batch)
  scores = logits[:, 0] if logits.shape[-1] == 1 else jax.nn.log_softmax(logits)[:, -1]
  return classification.predictions(logits), scores


def _input_text(example: Mapping[str, Any]) -> str:
  """The example's input text(s): 'inputs', or e.g. 'text_a | text_b'."""
  if 'inputs_pretokenized' in example:
    return _text(example['inputs_pretokenized'])
  return ' | '.join(_text(v) for k, v in sorted(example.items())
                    if k.endswith('_pretokenized') and k != 'targets_pretokenized')


def _until_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  return list(ids[:ids.index(eos_id)]) if eos_id in ids else [i for i in ids if i]


def _jsonable(x: Any) -> Any:
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, np.generic):
    return x.item()
  return x


def write_results(directory: str, results: Sequence[TaskResult], step: Optional[int]) -> str:
  """`metrics.json` (task -> metrics, plus the step) and `<task>.jsonl` rows; returns the path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'metrics.json')
  with open(path, 'w') as f:
    json.dump({'step': step, 'tasks': {r.task: r.metrics for r in results},
               'averages': averages(results)}, f, indent=1)
  for r in results:
    with open(os.path.join(directory, f'{r.task}.jsonl'), 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in r.rows)
  return path


# The leaderboard averages (each a function of `t5x_lite.metrics`) and the
# prefix of their benchmark's task names.
_AVERAGES = (('glue_average', 'glue_'), ('super_glue_average', 'super_glue_'))


def _averaged(tasks: Sequence[str]) -> list[tuple[str, str]]:
  """The averages that `tasks` give: a benchmark with at least two of them."""
  return [a for a in _AVERAGES if sum(t.startswith(a[1]) for t in tasks) >= 2]


def averages(results: Sequence[TaskResult]) -> dict[str, Any]:
  """The GLUE and SuperGLUE leaderboard averages, for a benchmark with at least
  two of its tasks evaluated (those missing are listed)."""
  from t5x_lite import metrics  # pylint: disable=g-import-not-at-top
  by_task = {r.task: r.metrics for r in results}
  out = {}
  for name, prefix in _averaged(list(by_task)):
    value, missing = getattr(metrics, name)(
        {t: m for t, m in by_task.items() if t.startswith(prefix)})
    out[name] = {'value': value, 'missing': list(missing)}
  return out


def format_row(name: str, metrics: Any, width: int = 0) -> str:
  """One task's metrics (or an average, a number) as one line of the table that
  evaluation prints: the name padded to `width`, then `metric value` pairs."""
  if isinstance(metrics, Mapping):
    cells = ', '.join(f'{k} {v:.2f}' for k, v in metrics.items())
  else:
    cells = f'{metrics:.2f}'
  return f'{name:<{width}}  {cells}'


def format_averages(results: Sequence[TaskResult], width: int = 0) -> list[str]:
  """The benchmark averages' rows (see `averages`), naming any task missing."""
  lines = []
  for name, avg in averages(results).items():
    note = f" (missing {', '.join(avg['missing'])})" if avg['missing'] else ''
    lines.append(format_row(name, avg['value'], width) + note)
  return lines


def table_width(tasks: Sequence[str]) -> int:
  """The name column's width for these tasks and the averages they give."""
  return max(len(name) for name in [*tasks, *(a[0] for a in _averaged(tasks))])
