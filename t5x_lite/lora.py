"""LoRA adapters for every family: low-rank updates of chosen kernels, trained
while the base params stay frozen.

A targeted projection computes

  y = x W + (alpha / r) * (dropout(x) A) B,     A [d_in, r], B [r, d_out]

with W the frozen kernel, A drawn as PEFT draws it (Kaiming-uniform, or a
normal of std 1/r) and B zero, so that an adapted model at step 0 computes
exactly what its base does.

The adapters are a tree of their own, mirroring the modules they adapt:
`{'decoder': {'layers_0': {'attention': {'query': {'lora_a', 'lora_b'}}}}}`.
Modules named in `modules_to_save` (by default a classifier's new head) sit
in the same tree with their full params, trained from the base's values.
Only this tree is trained (the optimizer state holds nothing else); the base
params are frozen state (`TrainState.frozen['base']`), read from
INITIAL_CHECKPOINT_PATH and never written into the run's checkpoints. A
bfloat16 base (the family's `param_dtype`) under float32 adapters is allowed.

One mechanism serves every family: `attach(base, adapters, config)` puts each
adapter's `lora_a` and its scaled `lora_b` beside the kernel they adapt in
the params given to the unchanged family's `apply`, and the layers that own
kernels (`layers.DenseGeneral` and the attention projections) add the
update when they find them (`adapter`, `term`); nothing else reads them, and
without them every layer computes what it did before. A scanned stack
(`scan_layers`) gets adapters with the same leading layer axis.

Targets are module names ('query', 'key', 'value', 'out', 'wi', 'wo',
'wi_0', ... or 'logits_dense'), or glob patterns over the '/'-joined module
path ('decoder/*/attention/query'). Every kernel of the zoo contracts its
first axis (the layers axis aside), so A takes the kernel's input axis and B
its output axes: A is sharded by (in-axis, None) and B by (None, out-axes...)
under the same logical rules as the kernel.

`LoraModel(base_model, config)` is the Model the trainer runs; its inference
methods (`logits`, `score`, `predict_batch`) take `attach`ed params.
`merge(base, adapters, config)` folds the adapters into the kernels
(W + (alpha / r) A B) for export. Around a DPO model
(`LoraModel(DPOModel(family))`), the reference policy is the base without
adapters: the frozen base params themselves, no copy.
"""

import dataclasses
import fnmatch
from typing import Any, Mapping, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import ops
from t5x_lite.errors import UserError
from t5x_lite.models.base import BaseModel

Array = jax.Array

# The entry of an adapter checkpoint's meta that names its base and its
# LoraConfig: {'checkpoint': the base's step directory, or None for the random
# init of 'seed', 'config': the LoraConfig's fields} (see `checkpoint_meta`).
CHECKPOINT_META = 'lora_base'

# The default targets: every attention projection of every family.
ATTENTION = ('query', 'key', 'value', 'out')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how.

  targets: module names or path globs (see the module docstring).
  rank: r. alpha: the update is scaled by alpha / rank.
  dropout_rate: dropout on each adapter's input (training only).
  init: 'kaiming_uniform' (PEFT's default for A) or 'gaussian' (std 1 / r).
  param_dtype: the adapters' dtype (float32 also under a bfloat16 base).
  modules_to_save: module names or path globs whose params are trained in
    full beside the adapters (PEFT's `modules_to_save`), starting from the
    base's values; None: the base model's FRESH_PARAMS (a classifier's new
    head), () none.
  """
  targets: Sequence[str] = ATTENTION
  rank: int = 8
  alpha: float = 16.0
  dropout_rate: float = 0.0
  init: str = 'kaiming_uniform'
  param_dtype: str = 'float32'
  modules_to_save: Optional[Sequence[str]] = None

  def __post_init__(self):
    if self.rank < 1:
      raise UserError(f'LoraConfig.rank={self.rank}; use a positive rank such as 8.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise UserError(f'LoraConfig.dropout_rate={self.dropout_rate}; use a rate in [0, 1).')
    if self.init not in ('kaiming_uniform', 'gaussian'):
      raise UserError(f"LoraConfig.init={self.init!r}; use 'kaiming_uniform' or 'gaussian'.")
    if not self.targets:
      raise UserError('LoraConfig.targets is empty; name modules such as '
                      "('query', 'value').")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


# -----------------------------------------------------------------------------
# What the layers call.
# -----------------------------------------------------------------------------
def adapter(module: nn.Module):
  """(A, B, dropout) of the adapter `attach` put beside `module`'s kernel,
  or None (every model that is not LoRA-adapted). `dropout` is None or
  (raw key, rate)."""
  if not module.has_variable('params', 'lora_a'):
    return None
  dropout = None
  if module.has_variable('params', 'lora_dropout'):
    dropout = (module.get_variable('params', 'lora_dropout'),
               module.get_variable('params', 'lora_dropout_rate'))
  return (module.get_variable('params', 'lora_a'), module.get_variable('params', 'lora_b'),
          dropout)


def term(x: Array, x_axes: str, adapter_: Any, out_axes: str, result: str, dtype: Any,
         in_shape: Optional[Sequence[int]] = None,
         out_shape: Optional[Sequence[int]] = None) -> Array:
  """The low-rank update `(x A) B` of a projection (B already scaled by
  alpha / r): `x_axes` are the einsum letters of x (its lead axes, then the
  contracted ones), `out_axes` those of B's outputs and `result` the update's
  layout; R is the rank.

  A [in..., R] and B [R, out...] are read as `in_shape` + [R] and [R] +
  `out_shape` when given (a joined [R, N*H] kernel serving a 'BTNH' result).
  With input dropout, x loses elements for this term only and the kept ones
  are scaled by 1 / (1 - rate), as PEFT's lora_dropout.
  """
  a, b, dropout = adapter_
  r = a.shape[-1]
  if in_shape is not None:
    a = a.reshape(tuple(in_shape) + (r,))
  if out_shape is not None:
    b = b.reshape((r,) + tuple(out_shape))
  lead = x_axes[:len(x_axes) - (a.ndim - 1)]
  contract = x_axes[len(lead):]
  if dropout is not None:
    key, rate = dropout
    keep = jax.random.bernoulli(jax.random.wrap_key_data(key), 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))
  xa = ops.einsum(f'{x_axes},{contract}R->{lead}R', x, a.astype(dtype))
  return ops.einsum(f'{lead}R,R{out_axes}->{result}', xa, b.astype(dtype))


# -----------------------------------------------------------------------------
# The adapter tree.
# -----------------------------------------------------------------------------
def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _matches(module: Sequence[str], patterns: Sequence[str]) -> bool:
  joined = '/'.join(module)
  return any(t == module[-1] or fnmatch.fnmatchcase(joined, t) for t in patterns)


def _targets(boxed_params: Any, config: LoraConfig) -> list[tuple[tuple[str, ...], Any]]:
  """(module path, boxed kernel) of every targeted kernel."""
  found = []
  flat = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=_is_boxed)[0]
  for path, leaf in flat:
    keys = tuple(str(p.key) for p in path)
    if keys[-1] != 'kernel' or len(keys) < 2 or not _matches(keys[:-1], config.targets):
      continue
    if not _is_boxed(leaf):
      raise ValueError(f"{'/'.join(keys)} has no logical axis names.")
    found.append((keys[:-1], leaf))
  if not found:
    raise UserError(f'LoraConfig.targets={tuple(config.targets)} match no kernel of the '
                    "model; name modules such as 'query', 'value', 'wi', 'wo'.")
  return found


def saved_params(params: Any, patterns: Sequence[str]) -> dict:
  """The params (boxed or not) of the modules `patterns` name, as a tree of
  the same paths: what `modules_to_save` trains in full."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)[0]:
    keys = tuple(str(p.key) for p in path)
    if any(_matches(keys[:i], patterns) for i in range(1, len(keys))):
      _set(out, keys, leaf)
  if patterns and not out:
    raise UserError(f'LoraConfig.modules_to_save={tuple(patterns)} match no module of the '
                    "model; name a module such as 'classifier', or set it to ().")
  return out


def _stacked(names: Sequence[Optional[str]]) -> int:
  """1 for the kernel of a scanned stack (a leading 'layers' axis), else 0."""
  return 1 if names and names[0] == 'layers' else 0


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Any, path: Sequence[str]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _has(tree: Any, path: Sequence[str]) -> bool:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return False
    tree = tree[k]
  return True


def init_adapters(rng: Array, boxed_params: Any, config: LoraConfig) -> dict:
  """Boxed adapters (with logical names) for the targeted kernels of
  `boxed_params` (a model's boxed 'params'; shapes are enough)."""
  dtype = jnp.dtype(config.param_dtype)
  r = config.rank
  adapters = {}
  for i, (module, kernel) in enumerate(_targets(boxed_params, config)):
    names, shape = tuple(kernel.names), tuple(kernel.value.shape)
    lead = _stacked(names)
    layers, d_in, out = shape[:lead], shape[lead], shape[lead + 1:]
    key = jax.random.fold_in(rng, i)
    a_shape = layers + (d_in, r)
    if config.init == 'kaiming_uniform':  # torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(d_in))
      bound = 1.0 / np.sqrt(d_in)
      a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    else:
      a = jax.random.normal(key, a_shape, dtype) / r
    b = jnp.zeros(layers + (r,) + out, dtype)
    _set(adapters, module, {
        'lora_a': nn.LogicallyPartitioned(a, names[:lead + 1] + (None,)),
        'lora_b': nn.LogicallyPartitioned(b, names[:lead] + (None,) + names[lead + 1:]),
    })
  return adapters


def _adapter_paths(adapters: Any) -> list[tuple[str, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_boxed)[0]
  return sorted({tuple(str(p.key) for p in path[:-1]) for path, _ in flat
                 if str(path[-1].key) in ('lora_a', 'lora_b')})


def _put_saved(tree: Any, adapters: Any) -> None:
  """Sets, in `tree`, the fully trained params (modules_to_save) of `adapters`."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_boxed)[0]:
    keys = tuple(str(p.key) for p in path)
    if keys[-1] not in ('lora_a', 'lora_b'):
      _get(tree, keys[:-1])[keys[-1]] = leaf


def attach(base: Any, adapters: Any, config: LoraConfig,
           dropout_rng: Optional[Array] = None) -> Any:
  """`base` with each adapter's `lora_a` and `lora_b` * alpha / r beside the
  kernel it adapts (a new tree; `base` is not changed), and with
  `dropout_rng` and a dropout rate its input dropout's key and rate."""
  out = jax.tree_util.tree_map(lambda x: x, base)  # fresh dicts, same leaves
  dropout = dropout_rng is not None and config.dropout_rate > 0.0
  for i, module in enumerate(_adapter_paths(adapters)):
    node, pair = _get(out, module), _get(adapters, module)
    if 'kernel' not in node:
      raise UserError(f"The adapter {'/'.join(module)} adapts no kernel of the base params; "
                      'use the adapters made for this model.')
    node['lora_a'] = pair['lora_a']
    node['lora_b'] = pair['lora_b'] * jnp.asarray(config.scale, pair['lora_b'].dtype)
    if dropout:
      layers = pair['lora_a'].shape[:-2]
      key = jax.random.fold_in(dropout_rng, i)
      keys = jax.random.split(key, int(np.prod(layers))) if layers else key
      if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
      node['lora_dropout'] = keys.reshape(layers + (-1,))
      node['lora_dropout_rate'] = jnp.full(layers, config.dropout_rate, jnp.float32)
  _put_saved(out, adapters)
  return out


def merge(base: Any, adapters: Any, config: LoraConfig) -> Any:
  """`base` with every adapted kernel replaced by W + (alpha / r) A B (in the
  kernel's dtype): params the family's own model (and its HF export) reads."""
  out = jax.tree_util.tree_map(lambda x: x, base)
  for module in _adapter_paths(adapters):
    node, pair = _get(out, module), _get(adapters, module)
    w, a, b = node['kernel'], pair['lora_a'], pair['lora_b']
    lead = a.ndim - 2
    flat_b = b.reshape(b.shape[:lead + 1] + (-1,)).astype(jnp.float32)
    delta = jnp.einsum('...ir,...ro->...io', a.astype(jnp.float32), flat_b) * config.scale
    node['kernel'] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
  _put_saved(out, adapters)
  return out


def num_params(adapters: Any) -> int:
  """How many numbers the adapters hold (boxed or not)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(adapters)))


def checkpoint_meta(config: LoraConfig, base_checkpoint: Optional[str],
                    seed: int) -> dict[str, Any]:
  """What an adapter checkpoint records (CHECKPOINT_META): its base, the step
  directory `base_checkpoint` or else the random init of `seed`, and `config`."""
  fields = dataclasses.asdict(config)
  fields['targets'] = list(fields['targets'])
  if fields['modules_to_save'] is not None:
    fields['modules_to_save'] = list(fields['modules_to_save'])
  return {'checkpoint': base_checkpoint, 'seed': None if base_checkpoint else seed,
          'config': fields}


# -----------------------------------------------------------------------------
# The model the trainer runs.
# -----------------------------------------------------------------------------
class LoraModel(BaseModel):
  """`base_model` with LoRA adapters: its params are the adapters only, and
  the base params are its frozen state `frozen['base']` (see the module
  docstring); the trainer builds them from `base_model` (random, or
  INITIAL_CHECKPOINT_PATH) and never checkpoints them.

  `logits`, `score` and `predict_batch` take `attach(base, adapters, config)`
  (`full_params`); everything else is the base model's.
  """

  def __init__(self, base_model: BaseModel, config: LoraConfig = LoraConfig()):
    if isinstance(base_model, LoraModel):
      raise UserError('LoraModel.base_model is already a LoraModel; wrap the family model.')
    self.base_model = base_model
    if config.modules_to_save is None:  # a new head trains in full
      config = dataclasses.replace(config, modules_to_save=tuple(base_model.FRESH_PARAMS))
    self.lora_config = config
    self.FRESH_PARAMS = base_model.FRESH_PARAMS  # (of the base checkpoint)
    self.FEATURE_CONVERTER_CLS = base_model.FEATURE_CONVERTER_CLS
    self.DECODER_ONLY = base_model.DECODER_ONLY
    self.GENERATES = base_model.GENERATES
    self.SCORES_RESPONSES = base_model.SCORES_RESPONSES

  def __getattr__(self, name: str) -> Any:
    # The base model's config, dummy_batch, module, ... (only for names this
    # class does not define).
    if name.startswith('__'):
      raise AttributeError(name)
    return getattr(self.base_model, name)

  @property
  def computes_vocab_logits(self) -> bool:
    return self.base_model.computes_vocab_logits

  @property
  def max_length(self) -> Optional[int]:
    return self.base_model.max_length

  def init(self, rng: Array, batch) -> Any:
    """The adapters, and the modules_to_save params (the base's init)."""
    base = self.base_model.init(rng, batch)['params']
    params = init_adapters(jax.random.fold_in(rng, 1), base, self.lora_config)
    saved = saved_params(base, self.lora_config.modules_to_save)
    for path, leaf in jax.tree_util.tree_flatten_with_path(saved, is_leaf=_is_boxed)[0]:
      keys = tuple(str(p.key) for p in path)
      if _has(params, keys[:-1] + ('lora_a',)):
        raise UserError(f"{'/'.join(keys[:-1])} is both a LoRA target and in "
                        'modules_to_save; name it in one of LoraConfig.targets / '
                        'modules_to_save.')
      _set(params, keys, leaf)
    return {'params': params}

  def initial_params(self, params: Any, base: Any) -> Any:
    """`params` with the modules_to_save params set to the base's: the
    fully trained modules start from the base checkpoint's values."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        saved_params(base, self.lora_config.modules_to_save))[0]:
      _set(out, tuple(str(p.key) for p in path), leaf)
    return out

  def full_params(self, base: Any, adapters: Any) -> Any:
    """The params the base model's functions take (no dropout)."""
    return attach(base, adapters, self.lora_config)

  def inference_params(self, params: Any, frozen: Any) -> Any:
    return self.full_params(frozen['base'], params)

  def loss_denominators(self, batch) -> dict[str, Array]:
    return self.base_model.loss_denominators(batch)

  def loss_fn(self, params: Any, batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None, frozen: Any = None):
    if not frozen or 'base' not in frozen:
      raise ValueError("LoraModel.loss_fn needs the base params as frozen['base'].")
    # The wrapped model's own frozen state is made of the base params: DPO's
    # reference is then the base without adapters (the same arrays, no copy).
    inner = self.base_model.frozen_state(frozen['base'])
    full = attach(frozen['base'], params, self.lora_config, dropout_rng)
    return self.base_model.loss_fn(full, batch, dropout_rng, denominators=denominators,
                                   frozen=inner)

  def logits(self, params: Any, batch) -> Array:
    return self.base_model.logits(params, batch)

  def score(self, params: Any, batch) -> Array:
    return self.base_model.score(params, batch)

  def predict_batch(self, params: Any, batch, rng: Optional[Array] = None, **options):
    return self.base_model.predict_batch(params, batch, rng, **options)
