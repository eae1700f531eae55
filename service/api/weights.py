"""A checkpoint's ``lit_model.pth`` as ``model.safetensors``, converted while it streams, without
torch.

``lit_model.pth`` is what ``torch.save`` writes for a state dict: a zip archive (entries stored,
not compressed) holding ``<name>/data.pkl``, a pickle of the dict whose tensors refer to storages
by key, and ``<name>/data/<key>``, each storage's raw bytes (little-endian unless
``<name>/byteorder`` says otherwise). :func:`read_state_index` unpickles ``data.pkl`` with an
unpickler that knows only the few globals such a pickle names (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``/``_rebuild_parameter`` and the typed storage classes) and
refuses every other one, so no code from the file runs; tensors become :class:`TensorRef`
(dtype, shape and where the bytes are). :class:`SafetensorsPlan` then lays them out as the
safetensors format (https://github.com/huggingface/safetensors, "Format": an 8-byte little-endian
header length, a JSON header of ``{name: {dtype, shape, data_offsets}}`` padded with spaces to 8
bytes, then the tensors' bytes back to back) and streams the bytes straight from the zip entries.
Key names are the state dict's own, so ``safetensors.torch.load_file`` gives what
``torch.load`` gives. Why here and not in a worker: the API process never imports torch
(CONTRIBUTING.md), a conversion on request needs neither a second copy on disk nor a worker,
and it works for every checkpoint already written.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SafetensorsPlan", "TensorRef", "UnconvertibleWeights", "read_state_index"]

#: Bytes read per chunk of a streamed tensor.
CHUNK = 1 << 20

#: torch's typed storage classes -> (safetensors dtype, bytes per element).
_STORAGES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("F64", 8),
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
}


class UnconvertibleWeights(ValueError):
    """The file is not a plain state dict of dense tensors that safetensors can hold."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    itemsize: int
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the state dict: its safetensors ``dtype``, ``shape``, and its bytes as
    ``nbytes`` bytes from ``offset`` of zip entry ``member``."""

    dtype: str
    shape: tuple[int, ...]
    member: str
    offset: int
    nbytes: int


def _rebuild_tensor(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_rest: Any,
) -> tuple[_Storage, int, tuple[int, ...], tuple[int, ...]]:
    return storage, storage_offset, tuple(size), tuple(stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a state-dict pickle; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnconvertibleWeights(f"lit_model.pth names {module}.{name}: not a plain state dict")

    def persistent_load(self, pid: Any) -> _Storage:
        try:
            kind, storage_type, key, _location, numel = pid
        except (TypeError, ValueError):
            raise UnconvertibleWeights(f"unknown storage reference {pid!r}") from None
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise UnconvertibleWeights(f"unknown storage reference {pid!r}")
        dtype, itemsize = _STORAGES[storage_type.name]
        return _Storage(dtype, itemsize, str(key), int(numel))


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


def read_state_index(path: Path) -> dict[str, TensorRef]:
    """The tensors of the state dict saved at ``path`` by ``torch.save``, in the dict's order.

    Raises:
        UnconvertibleWeights: not a zip-format torch file, not a dict of tensors, a tensor that
            is a strided view (not contiguous in its storage), or big-endian storage.
        OSError: the file cannot be read.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnconvertibleWeights(f"{path.name} is not a zip-format torch file") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnconvertibleWeights(f"{path.name} holds {len(pickles)} data.pkl entries")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
            raise UnconvertibleWeights(f"{path.name} was saved big-endian")
        with archive.open(pickles[0]) as fh:
            try:
                state = _Unpickler(fh).load()
            except UnconvertibleWeights:
                raise
            except Exception as exc:  # a damaged pickle: any error of the unpickler
                raise UnconvertibleWeights(f"{path.name}: {exc}") from None
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    if not isinstance(state, dict):
        raise UnconvertibleWeights(f"{path.name} holds a {type(state).__name__}, not a dict")
    out: dict[str, TensorRef] = {}
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, tuple) and len(value) == 4):
            raise UnconvertibleWeights(f"{path.name}: entry {key!r} is not a tensor")
        storage, offset, shape, stride = value
        if not _contiguous(shape, stride):
            raise UnconvertibleWeights(f"tensor {key} is a strided view of its storage")
        member = f"{prefix}data/{storage.key}"
        numel = math.prod(shape)
        start, nbytes = offset * storage.itemsize, numel * storage.itemsize
        if numel and (offset + numel > storage.numel or start + nbytes > sizes.get(member, -1)):
            raise UnconvertibleWeights(f"tensor {key} lies outside its storage {member}")
        out[key] = TensorRef(storage.dtype, shape, member, start, nbytes)
    return out


class SafetensorsPlan:
    """``model.safetensors`` of the state dict in ``path``: :attr:`length` bytes, iterated as
    chunks read from the zip entries (memory: one chunk). Raises what :func:`read_state_index`
    raises."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors = read_state_index(path)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        end = 0
        for key, ref in self.tensors.items():
            header[key] = {
                "dtype": ref.dtype,
                "shape": list(ref.shape),
                "data_offsets": [end, end + ref.nbytes],
            }
            end += ref.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((-len(text)) % 8)
        self.header = struct.pack("<Q", len(text)) + text
        self.length = len(self.header) + end

    def __iter__(self) -> Iterator[bytes]:
        yield self.header
        with zipfile.ZipFile(self.path) as archive:
            for ref in self.tensors.values():
                if not ref.nbytes:
                    continue
                with archive.open(ref.member) as fh:
                    fh.seek(ref.offset)
                    remaining = ref.nbytes
                    while remaining > 0:
                        chunk = fh.read(min(CHUNK, remaining))
                        if not chunk:
                            raise OSError(f"{self.path} shrank while it was being sent")
                        remaining -= len(chunk)
                        yield chunk
