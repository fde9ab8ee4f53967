"""A GGUF file's header (metadata and tensor table) read in one pass, tensors mapped.

The ``gguf`` package's reader builds a numpy view per metadata item, about 4 s for a
49k-token vocabulary on a 2-core CPU; this reads the same header in about 0.1 s with
plain ``struct`` and ``numpy.frombuffer``. Tensors are views of one read-only
``numpy.memmap`` of the file: nothing is read until a tensor is used.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # GGUF order: the row length first
    tensor_type: Any         # gguf.GGMLQuantizationType
    data: np.ndarray         # [rows, bytes per row] uint8 for block types, else typed


class GGUFFile:
    """``fields``: metadata key -> value (scalars, str, lists); ``tensors``: in file order."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mm
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 or 3)")
        self._buf = memoryview(buf)
        self._pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = tuple(self._u64() for _ in range(self._u32()))
            qtype = gguf.GGMLQuantizationType(self._u32())
            infos.append((name, dims, qtype, self._u64()))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, dims, qtype, offset in infos:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            count = int(np.prod(dims)) if dims else 1
            size = count // block * nbytes
            raw = buf[start + offset:start + offset + size]
            if len(raw) != size:
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            rows = tuple(reversed(dims))  # numpy order: (rows, row length)
            if qtype in _TYPED:
                data = raw.view(_TYPED[qtype]).reshape(rows)
            else:
                data = raw.reshape(*rows[:-1], rows[-1] // block * nbytes)
            self.tensors.append(TensorInfo(name, dims, qtype, data))

    def release(self, data: np.ndarray) -> None:
        """Drop the pages of ``data`` (a view of this file) from this process's resident
        memory once it has been copied: the file stays mapped and a later read maps them
        again, but a load no longer holds the file and its copy at once (a 2.4 GB file
        peaked at 5.2 GB resident)."""
        import mmap as _mmap

        try:
            start = data.ctypes.data - self._mm.ctypes.data
            page = _mmap.PAGESIZE
            first = start // page * page
            self._mm._mmap.madvise(_mmap.MADV_DONTNEED, first, start + data.nbytes - first)
        except (AttributeError, ValueError, OSError):  # no madvise here: keep the pages
            pass

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._buf, self._pos)
        self._pos += 4
        return v

    def _u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self._buf, self._pos)
        self._pos += 8
        return v

    def _str(self) -> str:
        n = self._u64()
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._str()
        if vtype == _ARRAY:
            etype, count = self._u32(), self._u64()
            if etype == _STRING:  # a vocabulary: its strings decoded when first read
                start, pos, buf, unpack = self._pos, self._pos, self._buf, _U64.unpack_from
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
                self._pos = pos
                return _Strings(buf, start, count)
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._pos)
                self._pos += dt.itemsize * count
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self._pos}")
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v


_U64 = struct.Struct("<Q")


class _Strings(Sequence):
    """A GGUF string array (a tokenizer's tokens or merges, 100k+ strings): its length is
    known at once, its strings decoded on first use (0.2 s a start that needs none of
    them, when the tokenizer comes from deepserve's cache)."""

    def __init__(self, buf: memoryview, start: int, count: int) -> None:
        self._buf, self._start, self._count = buf, start, count
        self._items: list[str] | None = None

    def _list(self) -> list[str]:
        if self._items is None:
            items, pos, buf, unpack = [], self._start, self._buf, _U64.unpack_from
            for _ in range(self._count):
                n = unpack(buf, pos)[0]
                items.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8",
                                                                  errors="replace"))
                pos += 8 + n
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __eq__(self, other: object) -> bool:
        return list(self) == (list(other) if isinstance(other, Sequence) else other)

    def __repr__(self) -> str:
        return repr(self._list())


def _typed() -> dict[Any, Any]:
    import gguf

    T = gguf.GGMLQuantizationType
    return {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8,
            T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


_TYPED = _typed()
