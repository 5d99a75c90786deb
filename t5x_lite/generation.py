"""Text generation with our checkpoints, for the data generators (Self-Instruct,
Evol-Instruct and the like).

A data generator takes a `GenerateFn`: a list of prompts -> one continuation
each. Tests give it a scripted function; a run gives it a `ModelGenerator`,
which samples a decoder-only checkpoint in fixed-size batches on a KV cache.
The run gins build it with `model_generator`, whose arguments (checkpoint,
lengths, temperature, top-p, top-k, seed) `configs/runs/generation.gin` binds
from macros:

    from t5x_lite import generation

    @gin.configurable
    def my_generator(*, output_dir: str, generate: generation.GenerateFn):
      log = generation.ResumableLog(os.path.join(output_dir, 'work.jsonl'),
                                    key_fields=('index',), settings={'seed': 0})
      todo = [i for i in range(len(PROMPTS)) if (i,) not in log]
      for i, text in zip(todo, generate([PROMPTS[i] for i in todo])):
        log.append([{'index': i, 'text': text}])

    # gin: include 'configs/runs/generation.gin'
    #      my_generator.generate = @generation.model_generator()

`ResumableLog` makes a long run restartable: it appends finished rows to a
JSONL as they finish, and the same command run again finds them and skips
that work; `generate_logged` runs a list of prompts through one.
"""

import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite.errors import UserError

# Generate: a list of prompts -> a list of continuations (one each).
GenerateFn = Callable[[Sequence[str]], list[str]]


def check_lengths(model: Any, prompt_length: int, max_decode_length: int) -> None:
  """The prompt and the continuation must fit the model's positions."""
  if model.max_length and prompt_length + max_decode_length - 1 > model.max_length:
    raise UserError(f'PROMPT_LENGTH {prompt_length} + MAX_DECODE_LENGTH {max_decode_length} '
                    f'exceeds the model max_positions={model.max_length}; lower one.')


def load_params(model: Any, checkpoint_path: Optional[str], batch_size: int, length: int,
                seed: int) -> Any:
  """The params of `checkpoint_path` (a step directory, or a run's directory for
  its latest step) for `model`; None gives a random init, with a warning (a
  smoke run)."""
  if checkpoint_path is None:
    print('warning: CHECKPOINT_PATH is None; using a random-init model (smoke run; give a '
          'checkpoint for real data).')
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    batch = model.dummy_batch(batch_size, length)
    return nn.unbox(model.init(jax.random.PRNGKey(seed), batch))['params']
  from t5x_lite import evaluation  # pylint: disable=g-import-not-at-top
  from t5x_lite.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  if not os.path.exists(checkpoint_path):
    raise UserError(f'CHECKPOINT_PATH {checkpoint_path} does not exist; give a checkpoint '
                    'step directory (MODEL_DIR/checkpoints/<step>) or None for a smoke run.')
  shapes = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32)
            for k, v in model.dummy_batch(batch_size, length).items()}
  return evaluation.load_params(model, Partitioner(), checkpoint_path, shapes)


class ModelGenerator:
  """Prompts -> continuations with a decoder-only model.

  Each call encodes the prompts (a prompt longer than `prompt_length - 1`
  tokens keeps its end), runs `predict_batch` on `batch_size` rows at a time
  (the last batch padded) and decodes each row up to its EOS. Sampling uses
  `temperature`, `top_p` and `top_k`, from a key split off `seed` per batch;
  method 'greedy' ignores them. One program is compiled per (method, length),
  before its first batch, so `usage()` tells compile time from generation time.
  """

  def __init__(self, model: Any, params: Any, vocabulary: Any, *, batch_size: int,
               prompt_length: int, max_decode_length: int, temperature: float,
               top_p: float, top_k: int, seed: int, checkpoint_path: Optional[str] = None):
    self.model, self.params, self.vocab = model, params, vocabulary
    self.checkpoint_path = checkpoint_path
    self.batch_size, self.prompt_length = batch_size, prompt_length
    self.max_decode_length = max_decode_length
    self.sample_options = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    self.seed = seed
    self.rng = jax.random.PRNGKey(seed)
    self._fns = {}
    self._usage = dict(calls=0, prompts=0, truncated_prompts=0, tokens=0, seconds=0.0,
                       compile_seconds=0.0)

  def settings(self) -> dict:
    """What the continuations depend on besides the params (for a run's log)."""
    return dict(checkpoint_path=self.checkpoint_path, batch_size=self.batch_size,
                prompt_length=self.prompt_length,
                max_decode_length=self.max_decode_length, seed=self.seed,
                **self.sample_options)

  def usage(self) -> dict:
    """Calls, prompts, prompts cut to fit, generated tokens (EOS excluded),
    generation and compile seconds, and tokens per generation second."""
    u = dict(self._usage)
    u['tokens_per_second'] = round(u['tokens'] / u['seconds'], 1) if u['seconds'] else None
    u['seconds'], u['compile_seconds'] = round(u['seconds'], 3), round(u['compile_seconds'], 3)
    return u

  def _fn(self, method: str, length: int, batch: dict):
    if (method, length) not in self._fns:
      options = self.sample_options if method == 'sample' else {}
      eos = self.vocab.eos_id

      def fn(params, batch, rng):
        return self.model.predict_batch(params, batch, rng, method=method,
                                        max_decode_length=length, eos_id=eos, **options)[0]
      start = time.time()
      self._fns[(method, length)] = jax.jit(fn).lower(self.params, batch, self.rng).compile()
      self._usage['compile_seconds'] += time.time() - start
    return self._fns[(method, length)]

  def __call__(self, prompts: Sequence[str], method: str = 'sample',
               max_decode_length: Optional[int] = None) -> list[str]:
    length = max_decode_length or self.max_decode_length
    out = []
    self._usage['calls'] += 1
    self._usage['prompts'] += len(prompts)
    for start in range(0, len(prompts), self.batch_size):
      chunk = list(prompts[start:start + self.batch_size])
      tokens = np.zeros((self.batch_size, self.prompt_length), np.int32)
      lengths = np.ones((self.batch_size,), np.int32)
      for i, prompt in enumerate(chunk):
        ids = self.vocab.encode(prompt)
        self._usage['truncated_prompts'] += len(ids) > self.prompt_length - 1
        ids = ids[-(self.prompt_length - 1):]  # keep the end
        tokens[i, 1:1 + len(ids)] = ids
        lengths[i] = len(ids)
      batch = {'decoder_input_tokens': tokens, 'decoder_prompt_lengths': lengths}
      fn = self._fn(method, length, batch)
      self.rng, rng = jax.random.split(self.rng)
      began = time.time()
      ids = np.asarray(fn(self.params, batch, rng))
      self._usage['seconds'] += time.time() - began
      for row in ids[:len(chunk)]:
        row = list(row)
        row = row[:row.index(self.vocab.eos_id)] if self.vocab.eos_id in row else row
        row = [int(t) for t in row if t > 0]
        self._usage['tokens'] += len(row)
        out.append(self.vocab.decode(row))
    return out


@gin.configurable
def model_generator(model: Any, checkpoint_path: Optional[str], *, vocabulary: Any = None,
                    batch_size: int = 8, prompt_length: int = 384,
                    max_decode_length: int = 96, temperature: float = 0.7,
                    top_p: float = 0.9, top_k: int = 0, seed: int = 0) -> ModelGenerator:
  """A `ModelGenerator` for `model` at `checkpoint_path` (None: random init).

  `vocabulary` None is the embedded BPE vocabulary (the GPT family's).
  """
  if not model.DECODER_ONLY:
    raise UserError(f'the data generators sample decoder-only models (GPT, Llama); '
                    f'{type(model).__name__} is not one: include a decoder model gin and its '
                    'checkpoint.')
  check_lengths(model, prompt_length, max_decode_length)
  if vocabulary is None:
    from t5x_lite.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    vocabulary = vocab_lib.embedded_bpe_vocabulary()
  params = load_params(model, checkpoint_path, batch_size, prompt_length, seed)
  return ModelGenerator(model, params, vocabulary, batch_size=batch_size,
                        prompt_length=prompt_length, max_decode_length=max_decode_length,
                        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                        checkpoint_path=checkpoint_path)


def _plain(value: Any) -> Any:
  """`value` as JSON reads it back (tuples become lists)."""
  return json.loads(json.dumps(value))


class ResumableLog:
  """Finished rows of a long run, appended to a JSONL as they finish, so that
  the same command run again skips them.

  The first line holds `settings`: whatever the rows depend on (seeds, input
  files, sampling settings). Every further line is one row, found again by
  its key: the tuple of its `key_fields` values (`key in log`, `log.get(key)`).
  Opening a log written with other settings raises UserError (its rows belong
  to another command); a last line cut short by a crash is dropped. `fresh`
  starts the file over.
  """

  def __init__(self, path: str, key_fields: Sequence[str],
               settings: Optional[Mapping[str, Any]] = None, fresh: bool = False):
    self.path, self.key_fields = path, tuple(key_fields)
    self.settings = _plain(dict(settings or {}))
    self._rows: dict[tuple, dict] = {}
    if fresh or not os.path.exists(path):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, 'w', encoding='utf-8') as f:
        f.write(json.dumps({'settings': self.settings}) + '\n')
    else:
      self._read()
    self.resumed = len(self._rows)

  def _read(self) -> None:
    with open(self.path, encoding='utf-8') as f:
      lines = f.read().splitlines(keepends=True)
    values = []
    for n, line in enumerate(lines, 1):
      try:
        values.append(json.loads(line))
      except ValueError:
        if n == len(lines):  # the write a crash interrupted
          break
        raise UserError(f'{self.path}:{n} is not a JSON row; delete the file to start '
                        'the run over.') from None
    stored = values[0].get('settings') if values and isinstance(values[0], dict) else None
    if stored != self.settings:
      stored = stored if isinstance(stored, dict) else {}
      changed = sorted(k for k in set(stored) | set(self.settings)
                       if stored.get(k) != self.settings.get(k))
      raise UserError(f'{self.path} holds rows of a run with other settings (differing: '
                      f"{', '.join(changed) or 'the header'}); rerun with those settings, "
                      'or delete the file to start over.')
    for row in values[1:]:
      self._rows[self.key(row)] = row
    if len(values) < len(lines) or not lines[-1].endswith('\n'):
      with open(self.path, 'w', encoding='utf-8') as f:  # whole lines only
        f.writelines(json.dumps(v) + '\n' for v in values)

  def key(self, row: Mapping[str, Any]) -> tuple:
    return tuple(row[k] for k in self.key_fields)

  def __contains__(self, key: tuple) -> bool:
    return tuple(key) in self._rows

  def __len__(self) -> int:
    return len(self._rows)

  def get(self, key: tuple) -> Optional[dict]:
    return self._rows.get(tuple(key))

  def rows(self) -> list[dict]:
    """Every row, in the order written."""
    return list(self._rows.values())

  def append(self, rows: Iterable[dict]) -> None:
    """Writes `rows` (all at once, then to disk) and remembers them."""
    rows = [_plain(r) for r in rows]
    for row in rows:
      if self.key(row) in self._rows:
        raise ValueError(f'{self.path} already holds the row {self.key(row)}')
    with open(self.path, 'a', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
      f.flush()
      os.fsync(f.fileno())
    for row in rows:
      self._rows[self.key(row)] = row


def generate_logged(generate: GenerateFn, prompts: Sequence[str], log: ResumableLog,
                    chunk_size: int, keys: Optional[Sequence[Mapping[str, Any]]] = None
                    ) -> list[str]:
  """The continuation of each prompt, through `log`: a prompt whose key is in
  the log gets the text written there; the others are generated `chunk_size`
  at a time, each chunk appended to the log as it finishes, so a run cut short
  loses at most one chunk. `keys` holds each prompt's key fields (default
  {'index': position}); rows are the key fields and 'text'.
  """
  keys = [dict(k) for k in keys] if keys is not None else [{'index': i} for i in
                                                            range(len(prompts))]
  if len(keys) != len(prompts):
    raise ValueError(f'{len(keys)} keys for {len(prompts)} prompts')
  todo = [i for i, k in enumerate(keys) if log.key(k) not in log]
  for start in range(0, len(todo), chunk_size):
    chunk = todo[start:start + chunk_size]
    texts = list(generate([prompts[i] for i in chunk]))
    if len(texts) != len(chunk):
      raise ValueError(f'the generator gave {len(texts)} continuations for {len(chunk)} prompts')
    log.append([{**keys[i], 'text': text} for i, text in zip(chunk, texts)])
  return [log.get(log.key(k))['text'] for k in keys]


class LoggedGenerator:
  """A GenerateFn whose calls go through a ResumableLog (key fields 'call' and
  'index'): the n-th call of stage `name` is logged as call '<name>:<n>'.

  For a run whose prompts follow from its settings and from earlier
  continuations (seeded sampling of prompts, parsing of what came back), the
  same command run again replays the logged calls, reaching the same state,
  and generates from the first prompt the log lacks. Keyword arguments
  (`method`, `max_decode_length`) go to the wrapped generator.
  """

  def __init__(self, generate: GenerateFn, log: ResumableLog, chunk_size: int, name: str):
    self.generate, self.log, self.chunk_size, self.name = generate, log, chunk_size, name
    self.calls = 0

  def __call__(self, prompts: Sequence[str], **kwargs) -> list[str]:
    self.calls += 1
    fn = (lambda batch: self.generate(batch, **kwargs)) if kwargs else self.generate
    call = f'{self.name}:{self.calls}'
    return generate_logged(fn, prompts, self.log, self.chunk_size,
                           [{'call': call, 'index': i} for i in range(len(prompts))])
