"""LoRA adapters (t5x_lite.lora) -> a PEFT adapter directory.

    adapter_config.json         peft_type 'LORA', r, lora_alpha, target_modules, ...
    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in]
                                base_model.model.<HF module>.lora_B.weight [out, r]

which `peft.PeftModel.from_pretrained(<the exported base>, directory)` loads.
PEFT scales B A by lora_alpha / r at run time, as `lora.attach` does, so A
and B are written unscaled.

Which HF module an adapter belongs to, and how its A and B are laid out,
comes from the family's own export (`to_hf`, e.g. `export_hf.hf_model`), not
from a second table of names: the export is run once on probe params whose
adapted kernels hold their input index (and once their output index), and
each HF tensor that turns out to be exactly one adapted kernel, as
`kernel.reshape(in, -1).T` (a torch Linear) or as `kernel.reshape(in, -1)`
(GPT-2's Conv1D, `fan_in_fan_out`), names the module and fixes the layout
(A.T and B.reshape(r, -1).T either way). A kernel exported any other way
(fused with others, as GPT-2's q/k/v in c_attn; rescaled; permuted) has no
PEFT form and is refused before anything is written.
"""

import json
import os
import shutil
from typing import Any, Callable, Optional

import jax
import numpy as np

from t5x_lite.errors import UserError
from t5x_lite.hf import io as hf_io

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'

# HF architecture name ending -> PEFT task_type (others: None, a plain PeftModel).
_TASK_TYPES = (('ForCausalLM', 'CAUSAL_LM'), ('LMHeadModel', 'CAUSAL_LM'),
               ('ForConditionalGeneration', 'SEQ_2_SEQ_LM'),
               ('ForSequenceClassification', 'SEQ_CLS'), ('Model', 'FEATURE_EXTRACTION'))


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(p.key) for p in path): leaf for path, leaf in flat}


def _blocks(adapters: Any) -> list[tuple[tuple[str, ...], tuple[int, ...], Any, Any]]:
  """(module path, layer index, A [in, r], B [r, out...]) of every adapter,
  one per layer of a scanned stack."""
  flat = _flat(adapters)
  saved = sorted({'/'.join(p[:-1]) for p in flat if p[-1] not in ('lora_a', 'lora_b')})
  if saved:
    raise UserError(f"the run trains {', '.join(saved)} in full (LoraConfig.modules_to_save), "
                    'which --lora_only does not write; export the merged model with '
                    '--merge_lora.')
  out = []
  for path in sorted({p[:-1] for p in flat}):
    a, b = np.asarray(flat[path + ('lora_a',)]), np.asarray(flat[path + ('lora_b',)])
    for index in np.ndindex(a.shape[:-2]):
      out.append((path, index, a[index], b[index]))
  return out


def _probes(base: Any, blocks: list) -> tuple[Any, Any, np.ndarray, np.ndarray]:
  """Two probe copies of `base` (views, no copies): every adapted kernel holds
  the code of its input row (first probe) or output column (second), codes
  unique over all blocks; every other leaf holds -1 (int8, one byte a
  number where the export copies). Also each block's first codes."""
  n_in = [a.shape[0] for _, _, a, _ in blocks]
  n_out = [int(np.prod(b.shape[1:])) for _, _, _, b in blocks]
  starts_in = np.concatenate([[0], np.cumsum(n_in)]).astype(np.int64)
  starts_out = np.concatenate([[0], np.cumsum(n_out)]).astype(np.int64)
  if max(starts_in[-1], starts_out[-1]) >= 2**31:
    raise ValueError('too many adapted numbers to probe the export with int32 codes.')
  flat = _flat(base)
  probe_in = {k: np.broadcast_to(np.int8(-1), np.shape(v)) for k, v in flat.items()}
  probe_out = dict(probe_in)
  by_kernel: dict[tuple[str, ...], list] = {}
  for i, (path, index, a, b) in enumerate(blocks):
    by_kernel.setdefault(path, []).append((i, index, a, b))
  for path, items in by_kernel.items():
    shape = np.shape(flat[path + ('kernel',)])
    lead = len(items[0][1])
    codes_in = np.empty(shape[:lead] + (shape[lead], 1), np.int32)
    codes_out = np.empty(shape[:lead] + (1, int(np.prod(shape[lead + 1:]))), np.int32)
    for i, index, a, _ in items:
      codes_in[index] = starts_in[i] + np.arange(a.shape[0])[:, None]
      codes_out[index] = starts_out[i] + np.arange(n_out[i])[None, :]
    probe_in[path + ('kernel',)] = np.broadcast_to(codes_in, shape[:lead + 1] + (
        int(np.prod(shape[lead + 1:])),)).reshape(shape)
    probe_out[path + ('kernel',)] = np.broadcast_to(codes_out, shape[:lead + 1] + (
        codes_out.shape[-1],)).reshape(shape)
  unflat = lambda leaves: jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(base), [leaves[k] for k in flat])
  return unflat(probe_in), unflat(probe_out), starts_in, starts_out


def _where(to_hf: Callable, base: Any, blocks: list) -> tuple[dict, list, dict]:
  """(HF config, [(HF module name, fan_in_fan_out)] per block, every HF tensor
  name) of the export of `base`; raises UserError naming an
  adapted kernel the export does not write as one Linear / Conv1D weight."""
  probe_in, probe_out, starts_in, starts_out = _probes(base, blocks)
  hf_config, sd_in = to_hf(probe_in)
  _, sd_out = to_hf(probe_out)
  found: dict[int, tuple[str, bool]] = {}
  problems = []
  for name, w_in in sd_in.items():
    w_in = np.asarray(w_in)
    if w_in.dtype == np.int8 or w_in.size == 0 or w_in.max() < 0:
      continue  # no adapted kernel in it
    w_out = np.asarray(sd_out[name])
    i = int(np.searchsorted(starts_in, w_in.flat[0], side='right')) - 1
    rows = starts_in[i] + np.arange(starts_in[i + 1] - starts_in[i])
    cols = starts_out[i] + np.arange(starts_out[i + 1] - starts_out[i])
    kind = None
    if w_in.flat[0] >= 0 and name.endswith('.weight') and w_in.ndim == 2:
      if (w_in.shape == (cols.size, rows.size) and np.all(w_in == rows[None, :])
          and np.all(w_out == cols[:, None])):
        kind = False  # torch Linear: [out, in]
      elif (w_in.shape == (rows.size, cols.size) and np.all(w_in == rows[:, None])
            and np.all(w_out == cols[None, :])):
        kind = True  # Conv1D: [in, out]
    if kind is None:
      problems.append(name)
      continue
    module = name[:-len('.weight')]
    if i in found and found[i][0] != module:
      problems.append(name)
    found[i] = (module, kind)
  missing = ['/'.join(path) for j, (path, _, _, _) in enumerate(blocks) if j not in found]
  if problems or missing:
    what = (f'the HF tensor {problems[0]} holds more than one adapted kernel as it is, or '
            'holds it fused, rescaled or permuted' if problems else
            f'the export writes no HF weight that is the kernel of {missing[0]}')
    raise UserError(f'these LoRA adapters have no PEFT form: {what} (e.g. GPT-2\'s c_attn '
                    'fuses query, key and value); --lora_only takes adapters of kernels '
                    'exported as one Linear each (Llama, Mistral, Qwen2, T5, BERT; GPT-2 '
                    "'out', 'wi', 'wo'), or export the merged model with --merge_lora.")
  kinds = {k for _, k in found.values()}
  if len(kinds) > 1:
    raise UserError('these LoRA adapters mix Linear and Conv1D modules, which one PEFT config '
                    'cannot hold (fan_in_fan_out); adapt one kind, or export the merged '
                    'model with --merge_lora.')
  return hf_config, [found[j] for j in range(len(blocks))], list(sd_in)


def _target_modules(adapted: set[str], hf_names) -> list[str]:
  """PEFT's target_modules: the adapted modules' last names where those pick
  exactly the adapted modules of the HF model, else their full names."""
  modules = {n.rsplit('.', 1)[0] for n in hf_names if '.' in n}
  short = {m.rsplit('.', 1)[-1] for m in adapted}
  if {m for m in modules if m.rsplit('.', 1)[-1] in short} == adapted:
    return sorted(short)
  return sorted(adapted)


def adapter_files(to_hf: Callable, base: Any, adapters: Any, config: Any, *,
                  base_name: Optional[str] = None, dtype: Optional[Any] = None
                  ) -> tuple[dict, dict]:
  """(adapter_config.json fields, {tensor name: array}) of `adapters` (a
  `lora.LoraConfig` `config`) over `base`; `to_hf(params)` is the family's
  export (-> (HF config, HF state dict)). Raises UserError (see the module
  docstring) for adapters with no PEFT form."""
  base = jax.tree_util.tree_map(np.asarray, jax.device_get(base))
  blocks = _blocks(jax.device_get(adapters))
  hf_config, where, hf_names = _where(to_hf, base, blocks)
  tensors = {}
  for (_, _, a, b), (module, _) in zip(blocks, where):
    r = a.shape[-1]
    tensors[f'{_PREFIX}{module}.lora_A.weight'] = np.ascontiguousarray(a.T)
    tensors[f'{_PREFIX}{module}.lora_B.weight'] = np.ascontiguousarray(b.reshape(r, -1).T)
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  architecture = (hf_config.get('architectures') or [''])[0]
  task_type = next((t for end, t in _TASK_TYPES if architecture.endswith(end)), None)
  alpha = config.alpha
  fields = {
      'peft_type': 'LORA', 'task_type': task_type,
      'base_model_name_or_path': base_name, 'revision': None, 'inference_mode': True,
      'r': config.rank, 'lora_alpha': int(alpha) if float(alpha).is_integer() else alpha,
      'lora_dropout': config.dropout_rate,
      'target_modules': _target_modules({m for m, _ in where}, hf_names),
      'fan_in_fan_out': where[0][1], 'bias': 'none', 'use_rslora': False,
      'modules_to_save': None, 'init_lora_weights': True, 'layers_to_transform': None,
      'layers_pattern': None, 'rank_pattern': {}, 'alpha_pattern': {}, 'use_dora': False,
      'lora_bias': False}
  return fields, tensors


def write(output_dir: str, fields: dict, tensors: dict) -> str:
  """Writes the adapter directory (via `output_dir.partial`, renamed when
  complete); returns a summary line. `output_dir` must be new or empty."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and os.listdir(output_dir):
    raise UserError(f'--output_dir {output_dir} is not empty; remove it or choose another.')
  partial = output_dir + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    with open(os.path.join(partial, CONFIG_FILE), 'w') as f:
      json.dump(fields, f, indent=2, sort_keys=True)
    written, = hf_io.write_safetensors(tensors, partial, max_shard_bytes=2**62)  # one file
    os.rename(os.path.join(partial, written), os.path.join(partial, WEIGHTS_FILE))
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.exists(output_dir):
    os.rmdir(output_dir)  # empty, checked above
  os.rename(partial, output_dir)
  count = sum(v.size for v in tensors.values())
  return (f"exported {len(tensors) // 2} LoRA adapter(s) (r={fields['r']}, {count:,} params, "
          f"targets {', '.join(fields['target_modules'][:8])}"
          f"{' ...' if len(fields['target_modules']) > 8 else ''}) as PEFT to {output_dir}")
