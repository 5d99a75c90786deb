"""Training entry point.

    python -m t5x_lite.train --gin_file=gin/t5_tiny_span.gin [--gin.TRAIN_STEPS=...]
        [--distributed=auto|on|off]

Re-running the same command resumes from the latest checkpoint in MODEL_DIR.
SIGTERM (a preempted VM) saves a checkpoint before exiting.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import dataclasses
import json
import os
import resource
import signal
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import jax
from jax.experimental import multihost_utils
import seqio
import tqdm
from tqdm.contrib import logging as tqdm_logging

from t5x_lite import checkpoints
from t5x_lite import distributed
from t5x_lite import gin_utils
from t5x_lite import host
from t5x_lite import lora
from t5x_lite import progress
from t5x_lite import runs
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import pipeline
from t5x_lite.errors import UserError


class MetricsWriter:
  """metrics.jsonl plus TensorBoard events under MODEL_DIR/train, process 0 only."""

  def __init__(self, model_dir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(model_dir, 'metrics.jsonl')
    if not self.enabled:
      return
    self._drop_rows_after(resume_step)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(model_dir, 'train'))

  def _drop_rows_after(self, step: int) -> None:
    """Rows logged after the checkpoint we resume from are repeated; drop them."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
    with open(self.path, 'w') as f:
      f.writelines(rows)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    with self._tb.as_default(step=step):
      for k, v in metrics.items():
        self._tf.summary.scalar(k, v)
    self._tb.flush()


class _Preemption:
  """SIGTERM (a preempted VM) as a flag the loop checks after each step.

  One process: a signal handler sets it. Several: JAX's preemption service
  (started by `jax.distributed.initialize`) catches SIGTERM on any process and
  agrees with the others on one step at which every process sees the flag, so
  that all of them save the same step.
  """

  def __init__(self):
    self.requested = False
    self._many = jax.process_count() > 1
    if not self._many:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def check(self, step: int) -> bool:
    """Whether to save and stop after `step` (call it after every step)."""
    if self._many:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self._many:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Save every `period` steps (and at the end, and on SIGTERM); keep the last
  `keep` (None: all); `async_save` writes while training goes on."""
  period: int = 1000
  keep: Optional[int] = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluate every `period` steps and at the end (0: never) on
  `mixture_or_task_name`'s `split` (default: the training task). `mode`
  'predict' / 'rank' scores the benchmark's way (see t5x_lite.evaluation);
  'loss' gives the model's own loss metrics (DPO: reward accuracy and
  rewards of held-out pairs)."""
  period: int = 0
  mixture_or_task_name: Optional[str] = None
  split: str = 'validation'
  batch_size: Optional[int] = None
  mode: str = 'predict'
  decode: Optional[Mapping[str, Any]] = None
  num_examples: Optional[int] = None
  # An exception inside evaluation: 'continue' training (one warning line) or
  # 'stop' (one error line); the step's checkpoint is written first either way.
  on_error: str = 'continue'

  def __post_init__(self):
    if self.on_error not in ('continue', 'stop'):
      raise UserError(f"EvalConfig.on_error={self.on_error!r} is unknown; use 'continue' "
                      "or 'stop'.")


def _start(run: runs.Run, trainer: trainer_lib.Trainer, config: runs.TrainConfig,
           ckpt: checkpoints.Checkpointer, say: Callable[..., None]):
  """(state, data position, data iterator): the latest checkpoint's, else fresh."""
  ds = run.dataset
  restored = ckpt.restore_latest(trainer.abstract_state().to_dict(), lambda: iter(ds))
  if restored is None:
    state = trainer.initial_state(run.seed, config.initial_checkpoint_path,
                                  config.fresh_params or run.model.FRESH_PARAMS)
    if config.initial_checkpoint_path:
      say(f'initialised params from {config.initial_checkpoint_path}')
    return state, 0, iter(ds)
  state, meta, data_iterator = trainer_lib.TrainState.from_dict(restored[0]), *restored[1:]
  _check_base(meta, ckpt)
  state = trainer.with_base(state, run.seed, config.initial_checkpoint_path,  # LoRA's base
                            config.fresh_params or run.model.FRESH_PARAMS)
  data_position, how = meta['data_position'], 'restored'
  if data_iterator is None:  # the checkpoint has no iterator: replay the pipeline
    data_iterator, how = iter(ds.skip(data_position)), 'replayed'
  say(f'resumed from {ckpt.directory}/{int(state.step)} '
      f'(data position {data_position}, input pipeline {how})')
  return state, data_position, data_iterator


def _base_record(run: runs.Run, config: runs.TrainConfig) -> dict[str, Any]:
  """What a LoRA run's checkpoints record (lora.checkpoint_meta): the step
  directory of INITIAL_CHECKPOINT_PATH, else the random init of `seed`."""
  path = config.initial_checkpoint_path
  return lora.checkpoint_meta(run.model.lora_config,
                              checkpoints.resolve_step_dir(path) if path else None, run.seed)


def _check_base(meta: dict[str, Any], ckpt: checkpoints.Checkpointer) -> None:
  """Stops a LoRA run that would resume its adapters over another base."""
  want, had = ckpt.extra_meta.get(lora.CHECKPOINT_META), meta.get(lora.CHECKPOINT_META)
  base = lambda record: (record['checkpoint'], record['seed'])
  if want is not None and had is not None and base(want) != base(had):
    was = had['checkpoint'] or f"the random init of seed {had['seed']}"
    now = want['checkpoint'] or f"the random init of seed {want['seed']}"
    raise UserError(f'the adapters in {ckpt.directory} were trained over {was}, but this run '
                    f'sets {now}; set INITIAL_CHECKPOINT_PATH back, or give the run a new '
                    'MODEL_DIR.')


def _evaluation(run: runs.Run, trainer: trainer_lib.Trainer, e: EvalConfig, model_dir: str):
  """The periodic evaluation of `e` (None when `e.period` is 0)."""
  if e.period <= 0:
    return None
  name = e.mixture_or_task_name or run.data.mixture_or_task_name
  if e.mode == 'loss':
    return _LossEvaluation(trainer, name, e.split, run.lengths, run.batch_size,
                           e.num_examples, run.data.vocabulary)
  return _Evaluation(run.model, run.partitioner, run.lengths, e.batch_size or run.batch_size,
                     name, e.split, e.mode, e.decode, e.num_examples, run.data.vocabulary,
                     model_dir)


def train(*,
          config: runs.TrainConfig,
          train_steps: int,
          model_dir: str,
          checkpoint: CheckpointConfig = CheckpointConfig(),
          evaluation: EvalConfig = EvalConfig(),
          log_every: int = 10,
          progress_bar: bool = True,
          max_nonfinite_steps: int = 10) -> dict[str, float]:
  """Trains to `train_steps` total steps, resuming from MODEL_DIR if it has a checkpoint.

  Fine-tuning: `config.initial_checkpoint_path` gives the params (not the
  optimizer state); subtrees named in `config.fresh_params` (default: the
  model's FRESH_PARAMS, a classifier head) may be absent from it and start
  from their random init. Evaluation (see `EvalConfig`) writes its metrics to
  metrics.jsonl as `eval/<task>/<metric>` and to MODEL_DIR/eval/<step>/.

  A step whose loss, gradients or new params are not finite is skipped
  (`nonfinite_steps` counts them); after `max_nonfinite_steps` skipped steps in
  a row the run stops with one line naming the step and the last checkpoint.

  Returns the last logged metrics (and the last eval's).
  """
  model_dir = os.path.abspath(model_dir)
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  say(f'MODEL_DIR: {model_dir}')
  if checkpoint.period <= 0 or train_steps <= 0:
    raise UserError(f'CHECKPOINT_PERIOD ({checkpoint.period}) and TRAIN_STEPS ({train_steps}) '
                    'must be positive.')
  run = config.build()  # stops at once when data is missing
  trainer = run.trainer(config.optimizer, config.num_microbatches)
  meta = None
  if run.model.base_model is not None:  # LoRA: each checkpoint names its base
    meta = {lora.CHECKPOINT_META: _base_record(run, config)}
  ckpt = checkpoints.Checkpointer(model_dir, checkpoint.period, checkpoint.keep,
                                  async_save=checkpoint.async_save, meta=meta)
  state, data_position, data_iterator = _start(run, trainer, config, ckpt, say)
  start_step = int(state.step)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(trainer.abstract_params))
  say(f'model: {n_params:,} params; mesh {dict(run.partitioner.mesh.shape)}; '
      f'batch {run.batch_size} x {run.lengths}')
  operative_config = gin.operative_config_str()  # empty when called without gin
  if operative_config and is_main:
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(operative_config)

  writer = MetricsWriter(model_dir, start_step)
  if start_step >= train_steps:
    say(f'already at step {start_step} >= TRAIN_STEPS={train_steps}; nothing to do.')
    ckpt.close()
    return {}
  evaluate = _evaluation(run, trainer, evaluation, model_dir)
  with progress.compiling('the train step', enabled=is_main):
    trainer.compile()
  try:
    check_host_memory(trainer)  # stops here when the step cannot fit
  except UserError:
    ckpt.close()
    raise
  step_fn = trainer.train_step
  tokens_per_batch = trainer.tokens_per_batch

  preemption = _Preemption()
  history, last_metrics, last_eval = [], {}, {}
  nonfinite = _NonFinite(max_nonfinite_steps)
  bar = tqdm.tqdm(total=train_steps, initial=start_step, disable=not (progress_bar and is_main),
                  dynamic_ncols=True, desc='train')
  # Lines meanwhile go above the bar, each on its own line.
  note = tqdm.tqdm.write if is_main else say
  interval_start, interval_steps = time.perf_counter(), 0
  step = start_step
  with tqdm_logging.logging_redirect_tqdm():  # warnings too
    try:
      while step < train_steps:
        batch = run.partitioner.shard_batch(_next_batch(data_iterator, run))
        state, metrics = step_fn(state, batch)
        step += 1
        data_position += 1
        history.append(metrics)
        nonfinite.add(metrics['nonfinite_steps'])
        interval_steps += 1
        bar.update(1)
        logs = step == start_step + 1 or step % log_every == 0 or step == train_steps
        evaluates = evaluate and (step % evaluation.period == 0 or step == train_steps)
        # An evaluated step is saved first, so that a failed evaluation loses nothing.
        saves = (preemption.check(step) or ckpt.should_save(step) or step == train_steps
                 or evaluates)
        if logs or saves or nonfinite.due():
          nonfinite.check(step, ckpt)  # stops the run after too many skipped steps
        if logs:
          metrics = trainer_lib.mean_metrics(history)  # the only host sync in the loop
          elapsed = time.perf_counter() - interval_start
          metrics['seconds_per_step'] = elapsed / interval_steps
          metrics['tokens_per_second'] = tokens_per_batch * interval_steps / elapsed
          writer.write(step, metrics)
          shown = ({'reward': metrics['reward_mean']} if 'reward_mean' in metrics  # RL
                   else {'acc': metrics.get('accuracy', float('nan'))})
          bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                          **{k: f'{v:.3f}' for k, v in shown.items()},
                          tok_s=f"{metrics['tokens_per_second']:,.0f}")
          last_metrics, history = metrics, []
          interval_start, interval_steps = time.perf_counter(), 0
        if saves:
          ckpt.save(step, state.to_dict(), data_position, data_iterator)
        if evaluates:
          eval_metrics = _run_evaluation(evaluate, state, step, evaluation.on_error, note)
          writer.write(step, eval_metrics)
          last_eval = eval_metrics or last_eval
          if eval_metrics:
            note(eval_lines(step, eval_metrics))
        if saves:  # (evaluated steps are saved) the heap's unused memory back (see host)
          host.release_free_memory()
        # A SIGTERM that lands after `saves` was decided stops the run at the next step.
        if saves and preemption.requested:
          ckpt.wait()
          bar.close()
          say(f'SIGTERM: saved checkpoint {ckpt.directory}/{step}; re-run the same command '
              'to resume.')
          raise SystemExit(143)
    finally:
      preemption.restore()
      bar.close()
      ckpt.close()
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  say(f"done: step {step}, loss {last_metrics.get('loss', float('nan')):.4f}, "
      f"{last_metrics.get('tokens_per_second', 0):,.0f} tokens/s, "
      f"{last_metrics.get('seconds_per_step', 0):.3f} s/step, peak RSS {peak_rss / 2**30:.2f} GiB")
  return dict(last_metrics, **last_eval)


def _next_batch(data_iterator, run: runs.Run) -> dict:
  """The next batch; a training split that yields none is one line."""
  try:
    return pipeline.next_numpy(data_iterator)
  except StopIteration:
    raise UserError(f"'{run.data.mixture_or_task_name}' has no examples in its "
                    f"'{run.data.split}' split; check its files, or set MIXTURE_OR_TASK_NAME.") from None


def check_host_memory(trainer: trainer_lib.Trainer) -> None:
  """Stops before the first step, in one line, when XLA's estimate of what the
  compiled step allocates on this host's CPU devices beyond the train state
  exceeds the host memory left (the OOM killer would end the run silently).
  The estimate is a lower bound (it leaves out the input pipeline and the
  runtime's own memory), so a run it passes may still not fit."""
  local = [d for d in trainer.partitioner.mesh.devices.flat
           if d.process_index == jax.process_index()]
  if not local or local[0].platform != 'cpu':
    return
  host.release_free_memory()  # what malloc holds free counts as available
  available = host.available_memory()
  if available is None:
    return
  needed = trainer.memory().running_bytes * len(local)
  if needed > available:
    raise UserError(
        f'the train step needs about {_size(needed)} of host memory beyond the train state '
        f"(XLA's estimate for {len(local)} CPU device(s)) and {_size(available)} is "
        'available; lower BATCH_SIZE, raise NUM_MICROBATCHES, or set the model config\'s '
        "remat_policy = 'full'.")


def _size(num_bytes: float) -> str:
  return (f'{num_bytes / 2**30:.1f} GiB' if num_bytes >= 2**30
          else f'{num_bytes / 2**20:.1f} MiB')


def eval_lines(step: int, flat: Mapping[str, float]) -> str:
  """An evaluation's `eval/<task>/<metric>` (and `eval/<average>`) metrics as
  the table evaluation prints, a row per task, under `eval at step N:`."""
  from t5x_lite import evaluation  # pylint: disable=g-import-not-at-top
  rows: dict[str, Any] = {}
  for key, value in flat.items():
    name, _, metric = key[len('eval/'):].rpartition('/')
    if name:
      rows.setdefault(name, {})[metric] = value
    else:
      rows[metric] = value
  width = max(len(name) for name in rows)
  lines = [evaluation.format_row(name, value, width) for name, value in rows.items()]
  if len(lines) == 1:
    return f'eval at step {step}: {lines[0]}'
  return '\n'.join([f'eval at step {step}:'] + ['  ' + line for line in lines])


class _NonFinite:
  """Counts the skipped (non-finite) steps in a row, reading the step flags
  from the device only at the loop's sync points (or every `limit` steps)."""

  def __init__(self, limit: int):
    if limit < 1:
      raise UserError(f'max_nonfinite_steps={limit} must be >= 1.')
    self.limit, self.pending, self.streak = limit, [], 0

  def add(self, flag: jax.Array) -> None:
    self.pending.append(flag)

  def due(self) -> bool:
    return len(self.pending) >= self.limit

  def check(self, step: int, ckpt: checkpoints.Checkpointer) -> None:
    for flag in jax.device_get(self.pending):
      self.streak = self.streak + 1 if flag else 0
    self.pending = []
    if self.streak >= self.limit:
      saved = ckpt.all_steps()
      last = f'{ckpt.directory}/{max(saved)}' if saved else 'none yet'
      first = step - self.streak + 1
      raise UserError(f'the loss became non-finite at step {first} and all {self.streak} updates '
                      f'since were skipped; the last checkpoint, {last}, holds the params from '
                      f'before step {first}; lower LEARNING_RATE or check the data, then re-run.')


def _run_evaluation(evaluate, state, step: int, on_error: str,
                    say: Callable[..., None]) -> dict[str, float]:
  """`evaluate(state, step)`; an exception is one line naming the task, then
  training goes on (`on_error='continue'`) or stops ('stop')."""
  try:
    return evaluate(state, step)
  except EvaluationError as e:
    if on_error == 'stop':
      raise UserError(f'{e}; the checkpoint of step {step} is saved.') from None
    say(f'warning: {e}; training continues (train_script.EvalConfig.on_error).')
    return {}


class EvaluationError(Exception):
  """An exception inside the evaluation of one task."""


class _Evaluation:
  """Periodic evaluation inside training: one Evaluator, every eval task."""

  def __init__(self, model, partitioner, lengths, batch_size, name, split, mode, decode,
               num_examples, vocabulary, model_dir):
    from t5x_lite import evaluation  # pylint: disable=g-import-not-at-top
    self._evaluation = evaluation
    self.tasks = evaluation.eval_tasks(name, split)
    self.evaluator = evaluation.Evaluator(
        model, partitioner, lengths, batch_size, split=split, mode=mode, decode=decode,
        num_examples=num_examples, vocabulary=vocabulary)
    self.model_dir = model_dir
    self.model = model

  def __call__(self, state, step: int) -> dict[str, float]:
    params = self.model.inference_params(state.params, state.frozen)
    results = [_guarded(task.name, step, self.evaluator.evaluate, params, task)
               for task in self.tasks]
    if jax.process_index() == 0:
      self._evaluation.write_results(
          os.path.join(self.model_dir, 'eval', str(step)), results, step)
    flat = {f'eval/{r.task}/{k}': v for r in results for k, v in r.metrics.items()}
    for name, avg in self._evaluation.averages(results).items():
      flat[f'eval/{name}'] = avg['value']
    return flat


class _LossEvaluation:
  """eval_mode='loss': the model's own metrics (loss, accuracy; DPO: reward
  accuracy, rewards, margin) on each task's held-out split, dropout off, as
  `eval/<task>/<metric>`: the mean over full batches of up to `num_examples`
  examples (default: all of the split)."""

  def __init__(self, trainer, name, split, lengths, batch_size, num_examples, vocabulary):
    task = pipeline.get_task_or_mixture(name)
    subtasks = [task] if isinstance(task, seqio.Task) else seqio.get_subtasks(task)
    self.tasks = [t.name for t in subtasks if split in t.splits]
    if not self.tasks:
      raise UserError(f"'{name}' has no task with a '{split}' split to evaluate; set "
                      'EVAL_MIXTURE_OR_TASK_NAME or the eval split.')
    self.trainer, self.batch_size, self.num_examples = trainer, batch_size, num_examples
    self._datasets = {t: pipeline.get_dataset(
        t, lengths, batch_size, split=split, shuffle=False, seed=None, pack=False, num_epochs=1,
        vocabulary=vocabulary, feature_converter_cls=trainer.model.FEATURE_CONVERTER_CLS)
        for t in self.tasks}

  def _metrics(self, state, task: str, ds) -> dict[str, float]:
    if self.num_examples:
      ds = ds.take(max(self.num_examples // self.batch_size, 1))
    history = [self.trainer.eval_metrics(state, self.trainer.partitioner.shard_batch(
        {k: v.numpy() for k, v in batch.items()})) for batch in ds]
    if not history:
      raise UserError(f"'{task}' has fewer held-out examples than one batch of "
                      f'{self.batch_size}; lower BATCH_SIZE or add examples.')
    return trainer_lib.mean_metrics(history)

  def __call__(self, state, step: int) -> dict[str, float]:
    return {f'eval/{task}/{k}': v for task, ds in self._datasets.items()
            for k, v in _guarded(task, step, self._metrics, state, task, ds).items()}


def _guarded(task: str, step: int, fn: Callable[..., Any], *args) -> Any:
  """`fn(*args)`, an exception (other than a UserError) as an EvaluationError
  naming the task."""
  try:
    return fn(*args)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (reported with the task named)
    first = (str(e).strip().splitlines() or [''])[0]
    raise EvaluationError(f'evaluating {task} at step {step} failed: '
                          f'{type(e).__name__}: {first}') from e


def main(argv: Sequence[str]) -> None:
  """`--distributed=auto|on|off` (see t5x_lite.distributed), then the gin flags."""
  mode = 'auto'
  flags = []
  for arg in argv:
    if arg.startswith('--distributed='):
      mode = arg.split('=', 1)[1]
    else:
      flags.append(arg)
  files, bindings = gin_utils.parse_flags(flags)
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  distributed.initialize(mode)  # before anything touches the devices
  gin_utils.parse_gin(files, bindings)
  gin.get_configurable(train)()


if __name__ == '__main__':
  import t5x_lite.train as train_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(train_module.main, 'train')
