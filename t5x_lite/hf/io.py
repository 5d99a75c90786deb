"""Reading and writing Hugging Face model directories in numpy, without torch.

A directory written by `save_pretrained` holds `config.json` and the weights
as one of (looked for in this order):

  model.safetensors
  model.safetensors.index.json  + the shards its `weight_map` names
  pytorch_model.bin             (torch.save zip format)
  pytorch_model.bin.index.json  + the shards its `weight_map` names

`read_state_dict` returns `{HF tensor name: numpy array}` in the stored dtype;
bfloat16 comes back as `ml_dtypes.bfloat16` (numpy has no bfloat16 of its
own). `.bin` files are parsed with `zipfile` and a restricted unpickler that
only rebuilds tensors, so no torch import and no arbitrary code from the file.

`write_safetensors` writes weights the way `save_pretrained` does: one
`model.safetensors`, or above `max_shard_bytes` the shards
`model-0000K-of-0000N.safetensors` and their `model.safetensors.index.json`.
"""

import collections
import json
import os
import pickle
import zipfile
from typing import Dict, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from t5x_lite.errors import UserError

StateDict = Dict[str, np.ndarray]

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json',
                'pytorch_model.bin', 'pytorch_model.bin.index.json')

# safetensors dtypes that `safetensors.numpy` cannot represent.
_ML_DTYPES = {'BF16': ml_dtypes.bfloat16,
              'F8_E4M3': ml_dtypes.float8_e4m3fn,
              'F8_E5M2': ml_dtypes.float8_e5m2}

# torch storage class name -> numpy dtype.
_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


def read_config(directory: str) -> dict:
  """The parsed `config.json` of a HF model directory."""
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{directory} has no config.json; give a directory written '
                    "by Hugging Face's save_pretrained.")
  with open(path) as f:
    return json.load(f)


# --- safetensors -------------------------------------------------------------
def _raw_safetensors(path: str, names) -> StateDict:
  """Tensors `names` of a safetensors file read from its header and bytes."""
  with open(path, 'rb') as f:
    header_len = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + header_len)
  out = {}
  for name in names:
    info = header[name]
    begin, end = info['data_offsets']
    dtype = _ML_DTYPES[info['dtype']]
    out[name] = np.array(data[begin:end].view(dtype).reshape(info['shape']))
  return out


def read_safetensors(path: str) -> StateDict:
  """{name: array} of one safetensors file (bfloat16 as ml_dtypes.bfloat16)."""
  out, special = {}, []
  with safetensors.safe_open(path, framework='np') as f:
    for name in f.keys():
      if f.get_slice(name).get_dtype() in _ML_DTYPES:
        special.append(name)
      else:
        out[name] = f.get_tensor(name)
  out.update(_raw_safetensors(path, special))
  return out


# --- torch .bin (zip) --------------------------------------------------------
class _StorageType:
  """Stands in for a `torch.*Storage` class inside the unpickler."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_STORAGES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
  """torch._utils._rebuild_tensor_v2 over a flat numpy storage."""
  if not size:
    return np.array(storage[storage_offset])
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view)  # contiguous copy, independent of the storage


def _rebuild_parameter(data, *unused_args):
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch.save state dict into numpy arrays; refuses all else."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str,
               byteorder: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix
    self._byteorder = '<' if byteorder == 'little' else '>'
    self._storages = {}

  def find_class(self, module, name):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor_v2
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _TORCH_STORAGES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f'{module}.{name} is not allowed in a weights file (only tensors and '
        'dicts are read); re-save the state dict with torch.save or as '
        'safetensors.')

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid
    if kind != 'storage' or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid[:2]!r}')
    if key not in self._storages:
      raw = self._archive.read(f'{self._prefix}data/{key}')
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      array = np.frombuffer(raw, dtype=dtype, count=numel)
      self._storages[key] = array.astype(array.dtype.newbyteorder('='))
    return self._storages[key]


def read_torch_bin(path: str) -> StateDict:
  """{name: array} of a torch.save'd state dict (zip format), without torch."""
  if not zipfile.is_zipfile(path):
    raise UserError(f'{path} is not in the zip format of torch >= 1.6; re-save '
                    'it with a recent torch or convert it to safetensors.')
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith('data.pkl')]
    if len(pkl) != 1:
      raise UserError(f'{path} holds no single data.pkl; it is not a '
                      'torch.save file.')
    prefix = pkl[0][:-len('data.pkl')]
    names = set(archive.namelist())
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode().strip()
    with archive.open(pkl[0]) as f:
      state = _TorchUnpickler(f, archive, prefix, byteorder).load()
  if not isinstance(state, Mapping):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict.')
  return dict(state)


# --- a directory -------------------------------------------------------------
def _read_sharded(directory: str, index_name: str, read_one) -> StateDict:
  with open(os.path.join(directory, index_name)) as f:
    weight_map = json.load(f)['weight_map']
  out = {}
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
      raise UserError(f'{index_name} names shard {shard}, which is not in '
                      f'{directory}; download every shard.')
    out.update(read_one(path))
  return out


def read_state_dict(directory: str) -> StateDict:
  """All weights of a HF model directory as {name: numpy array}."""
  def has(name):
    return os.path.isfile(os.path.join(directory, name))

  if has('model.safetensors'):
    return read_safetensors(os.path.join(directory, 'model.safetensors'))
  if has('model.safetensors.index.json'):
    return _read_sharded(directory, 'model.safetensors.index.json',
                         read_safetensors)
  if has('pytorch_model.bin'):
    return read_torch_bin(os.path.join(directory, 'pytorch_model.bin'))
  if has('pytorch_model.bin.index.json'):
    return _read_sharded(directory, 'pytorch_model.bin.index.json',
                         read_torch_bin)
  raise UserError(f'{directory} has no weights; looked for '
                  f"{', '.join(WEIGHT_FILES)}.")


# --- writing -------------------------------------------------------------------
_SAFETENSORS_DTYPES = {np.dtype(np.float64): 'F64', np.dtype(np.float32): 'F32',
                       np.dtype(np.float16): 'F16', np.dtype(ml_dtypes.bfloat16): 'BF16',
                       np.dtype(np.int64): 'I64', np.dtype(np.int32): 'I32',
                       np.dtype(np.int16): 'I16', np.dtype(np.int8): 'I8',
                       np.dtype(np.uint8): 'U8', np.dtype(np.bool_): 'BOOL'}


def _write_one(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """One safetensors file: an 8-byte header length, the JSON header, the bytes
  (in the header's order, each 8-byte aligned as the format recommends)."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, x in tensors.items():
    if x.dtype not in _SAFETENSORS_DTYPES:
      raise UserError(f'tensor {name} has dtype {x.dtype}, which safetensors cannot hold.')
    header[name] = {'dtype': _SAFETENSORS_DTYPES[x.dtype], 'shape': list(x.shape),
                    'data_offsets': [offset, offset + x.nbytes]}
    offset += x.nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little'))
    f.write(text)
    for x in tensors.values():
      f.write(np.ascontiguousarray(x).tobytes())


def write_safetensors(state_dict: Mapping[str, np.ndarray], directory: str,
                      max_shard_bytes: int = 5 * 2**30) -> list:
  """Writes `state_dict` into `directory` as `save_pretrained` lays it out;
  returns the file names written. Tensors go into shards in name order, a new
  shard starting when the next tensor would pass `max_shard_bytes` (a tensor
  larger than that has a shard of its own)."""
  shards, size = [[]], 0
  for name in sorted(state_dict):
    nbytes = np.asarray(state_dict[name]).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  if len(shards) == 1:
    names = ['model.safetensors']
  else:
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map = {}
  for file_name, shard in zip(names, shards):
    _write_one(os.path.join(directory, file_name),
               {name: np.asarray(state_dict[name]) for name in shard})
    weight_map.update(dict.fromkeys(shard, file_name))
  if len(shards) > 1:
    total = sum(np.asarray(x).nbytes for x in state_dict.values())
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
    names.append('model.safetensors.index.json')
  return names
