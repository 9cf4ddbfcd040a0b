"""One checkpoint folder of safetensors files: tensor index at open time, lazy reads after.

A folder holds a single ``model.safetensors``, several ``*.safetensors`` files, or
shards listed by ``model.safetensors.index.json`` (then only the files the index
names are used). Construction reads only each file's header (names, dtypes,
shapes, byte offsets), never tensor data. Reads go through one ``safe_open``
handle per file, opened on first use and kept until :meth:`CheckpointSource.close`.

A CPU read returns a tensor backed by the file's memory map, so every page a
consumer touches stays resident in this process until the map goes.
:meth:`CheckpointSource.release_pages` drops the resident pages of the tensors read
so far (Linux ``madvise(MADV_DONTNEED)`` on the file's own mapping; the data stays
in the page cache and is faulted back in if a tensor is used again). A load that
releases after each weight therefore holds about one weight of file pages at a
time instead of every file it has read.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from sglang.srt.enhanced.errors import EnhancedError

if TYPE_CHECKING:
    from sglang.srt.enhanced.config import EnhancedConfig, Precision
    from sglang.srt.enhanced.mixed_precision.decoders.base import WeightDecoder

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "CheckpointSource", "SourceSet", "StoredTensor", "open_sources", "read_header"]

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024
_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {name: dtype.itemsize for name, dtype in _TORCH_DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Header entry of one stored tensor."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(file: Path) -> dict[str, StoredTensor]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without reading data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EnhancedError("not a safetensors file (shorter than 8 bytes)", culprit=str(file))
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise EnhancedError(f"not a safetensors file (header length {n})", culprit=str(file))
            raw = f.read(n)
    except OSError as e:
        raise EnhancedError(f"cannot read checkpoint file: {e.strerror or e}", culprit=str(file)) from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EnhancedError(f"corrupt safetensors header: {e}", culprit=str(file)) from e
    if not isinstance(header, dict):
        raise EnhancedError("corrupt safetensors header: not an object", culprit=str(file))
    out: dict[str, StoredTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            out[name] = StoredTensor(
                name, file, str(meta["dtype"]), tuple(int(d) for d in meta["shape"]), begin, end - begin
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EnhancedError(f"corrupt header entry for tensor {name[:80]!r}", culprit=str(file)) from e
    _check_layout(file, out, size - 8 - n)
    return out


def _check_layout(file: Path, tensors: dict[str, StoredTensor], data_bytes: int) -> None:
    """Each tensor's bytes match its dtype and shape; together they tile the data section exactly.

    This is what safetensors itself requires when a file is opened, so a file that passes
    here opens; a truncated file (data shorter than the header says) is refused here.
    """
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
        itemsize = _ITEMSIZE.get(info.dtype)
        where = f"{file}:{info.name[:200]}"
        if itemsize is None:
            raise EnhancedError(f"unsupported safetensors dtype {info.dtype[:20]!r}", culprit=where)
        if any(d < 0 for d in info.shape) or info.nbytes < 0:
            raise EnhancedError(f"negative shape or offsets {list(info.shape)}", culprit=where)
        expected = math.prod(info.shape) * itemsize
        if info.nbytes != expected:
            raise EnhancedError(
                f"header gives {info.nbytes} bytes for {info.dtype} {list(info.shape)} ({expected} bytes)",
                culprit=where,
            )
        if info.offset != position:
            raise EnhancedError(
                f"data offsets {info.offset}..{info.offset + info.nbytes} "
                + ("overlap another tensor" if info.offset < position else f"leave a gap after byte {position}"),
                culprit=where,
            )
        position += info.nbytes
    if position != data_bytes:
        raise EnhancedError(
            f"file holds {data_bytes} data bytes, its header describes {position}"
            + (" (truncated?)" if data_bytes < position else ""),
            culprit=str(file),
        )


class CheckpointSource:
    """Tensor index and lazy reader of one checkpoint folder.

    ``decoder`` overrides the one chosen from the folder's quantization config.
    """

    def __init__(self, folder: str | Path, decoder: WeightDecoder | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EnhancedError("checkpoint folder does not exist", culprit=str(self.folder))
        self._decoder = decoder
        self._logical: dict[str, tuple[str, ...]] | None = None
        self._handles: dict[Path, Any] = {}
        # Per open file: the address ranges of its memory map, and spans read but not yet released.
        self._maps: dict[Path, list[tuple[int, int]]] = {}
        self._read_spans: list[tuple[Path, int, int]] = []
        self._read_bytes = 0
        self._tensors = self._index()
        self.files: tuple[Path, ...] = tuple(dict.fromkeys(t.file for t in self._tensors.values()))
        logger.debug(
            "checkpoint %s: %d tensors in %d files", self.folder, len(self._tensors), len(self.files)
        )

    def _index(self) -> dict[str, StoredTensor]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            return self._index_from_json(index)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise EnhancedError("no *.safetensors files in checkpoint folder", culprit=str(self.folder))
        tensors: dict[str, StoredTensor] = {}
        for file in files:
            for name, info in sorted(read_header(file).items(), key=lambda kv: kv[1].offset):
                if name in tensors:
                    raise EnhancedError(
                        f"tensor stored twice: in {tensors[name].file.name} and {file.name}", culprit=name
                    )
                tensors[name] = info
        return tensors

    def _index_from_json(self, index: Path) -> dict[str, StoredTensor]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EnhancedError(f"unreadable index: {e}", culprit=str(index)) from e
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(str(file_name), []).append(name)
        tensors: dict[str, StoredTensor] = {}
        for file_name in sorted(by_file):
            file = self.folder / file_name
            if not file.is_file():
                raise EnhancedError(
                    f"{INDEX_FILE} lists {len(by_file[file_name])} tensors in a file that does not exist",
                    culprit=str(file),
                )
            header = read_header(file)
            for name in by_file[file_name]:
                if name not in header:
                    raise EnhancedError(
                        f"{INDEX_FILE} places this tensor in {file_name}, which does not hold it",
                        culprit=name,
                    )
            unlisted = len(header) - len(by_file[file_name])
            if unlisted:
                logger.debug("%s: %d tensors not listed in %s are ignored", file, unlisted, INDEX_FILE)
            for name in sorted(by_file[file_name], key=lambda n: header[n].offset):
                tensors[name] = header[name]
        return tensors

    # -- stored tensors ---------------------------------------------------------------------------

    @property
    def stored_names(self) -> tuple[str, ...]:
        """Stored tensor names in checkpoint order (file, then offset)."""
        return tuple(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> StoredTensor:
        """Header entry of a stored tensor."""
        try:
            return self._tensors[name]
        except KeyError:
            raise EnhancedError(f"no such tensor in checkpoint {self.folder}", culprit=name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        info = self.info(name)
        try:
            return _TORCH_DTYPES[info.dtype]
        except KeyError:
            raise EnhancedError(f"unsupported safetensors dtype {info.dtype}", culprit=name) from None

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes on disk."""
        return self.info(name).nbytes

    def file_of(self, name: str) -> Path:
        return self.info(name).file

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Read one stored tensor and move it to ``device``."""
        file = self.file_of(name)
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise EnhancedError(f"cannot open checkpoint file: {e}", culprit=str(file)) from e
            self._handles[file] = handle
            self._maps[file] = _mapped_ranges(file)
        tensor = handle.get_tensor(name)
        span = (file, tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if (device if isinstance(device, torch.device) else torch.device(device)).type == "cpu":
            self._read_spans.append(span)
            self._read_bytes += span[2]
            return tensor
        out = tensor.to(device)  # returns once the host pages have been read
        del tensor
        self._release((span,))
        return out

    def release_pages(self, min_bytes: int = 0) -> int:
        """Drop this process's resident file pages of every tensor read since the last release.

        Call it once the consumer is done with those tensors. Their data stays valid (it is
        re-read from the page cache on access); only in-place changes to a tensor would be
        lost. With ``min_bytes`` nothing happens until at least that many bytes have been
        read since the last release (fewer, larger releases). Returns the bytes released
        (0 where memory maps cannot be inspected).
        """
        if self._read_bytes < min_bytes or not self._read_spans:
            return 0
        spans, self._read_spans, self._read_bytes = self._read_spans, [], 0
        return self._release(spans)

    def _release(self, spans) -> int:  # noqa: ANN001 - iterable of (file, address, nbytes)
        # Spans of one file that touch or overlap are merged, so a run of neighbouring
        # tensors is one call and the pages they share are released too.
        merged: list[list] = []
        for file, address, nbytes in sorted(spans):
            last = merged[-1] if merged else None
            if last is not None and last[0] == file and address <= last[2] + _PAGE:
                last[2] = max(last[2], address + nbytes)
            else:
                merged.append([file, address, address + nbytes])
        released = 0
        for file, address, stop in merged:
            start = -(-address // _PAGE) * _PAGE
            end = stop // _PAGE * _PAGE
            if end <= start or not any(lo <= start and end <= hi for lo, hi in self._maps.get(file, ())):
                continue
            if _madvise(start, end - start):
                released += end - start
        return released

    @property
    def open_files(self) -> tuple[Path, ...]:
        """Files with an open read handle."""
        return tuple(self._handles)

    def close(self) -> None:
        """Drop every read handle (later reads reopen files)."""
        self._handles.clear()
        self._maps.clear()
        self._read_spans.clear()
        self._read_bytes = 0

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- logical weights --------------------------------------------------------------------------

    @property
    def decoder(self) -> WeightDecoder:
        """The decoder for this checkpoint's format."""
        if self._decoder is None:
            from sglang.srt.enhanced.mixed_precision.decoders.registry import decoder_for_checkpoint

            self._decoder = decoder_for_checkpoint(self.folder)
        return self._decoder

    def logical_names(self) -> dict[str, tuple[str, ...]]:
        """Logical weight name -> the stored tensors it decodes from, in checkpoint order."""
        if self._logical is None:
            logical = self.decoder.logical_names(self.stored_names)
            for name, parts in logical.items():
                if not parts:
                    raise EnhancedError("decoder gives no stored tensors for this weight", culprit=name)
                for part in parts:
                    if part not in self._tensors:
                        raise EnhancedError(
                            f"decoder names a stored tensor {part!r} that does not exist", culprit=name
                        )
            first = {n: i for i, n in enumerate(self._tensors)}
            self._logical = dict(sorted(logical.items(), key=lambda kv: min(first[p] for p in kv[1])))
        return self._logical

    def part_shapes(self, logical_name: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the stored parts of one logical weight."""
        return {p: self.shape(p) for p in self.logical_names()[logical_name]}

    def __repr__(self) -> str:
        return (
            f"CheckpointSource({str(self.folder)!r}, {len(self._tensors)} tensors, {len(self.files)} files)"
        )


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process maps ``file`` (empty where /proc is not available)."""
    if not sys.platform.startswith("linux"):
        return []
    target = str(file.resolve())
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


_LIBC: Any = None


def _madvise(address: int, length: int) -> bool:
    """``madvise(MADV_DONTNEED)`` on a page-aligned range of a file mapping; False if it fails."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _LIBC.madvise.restype = ctypes.c_int
    return _LIBC.madvise(address, length, _MADV_DONTNEED) == 0


class SourceSet(Mapping["Precision", CheckpointSource]):
    """The opened checkpoint of every precision; precisions sharing a folder share one source.

    A read-only mapping ``Precision -> CheckpointSource`` that closes every distinct
    source once (``close()`` or ``with``).
    """

    def __init__(self, sources: Mapping[Precision, CheckpointSource]) -> None:
        self._sources = dict(sources)

    def __getitem__(self, precision: Precision) -> CheckpointSource:
        return self._sources[precision]

    def __iter__(self) -> Iterator[Precision]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    @property
    def distinct(self) -> tuple[CheckpointSource, ...]:
        """Each opened folder once, in first-use order."""
        return tuple({id(s): s for s in self._sources.values()}.values())

    def close(self) -> None:
        """Drop the read handles of every source."""
        for source in self.distinct:
            source.close()

    def __enter__(self) -> SourceSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sources(config: EnhancedConfig) -> SourceSet:
    """Open the folder of every precision the config uses; precisions sharing a folder share a source.

    A missing or empty folder raises ``EnhancedError`` naming the config key and the folder.
    """
    sources: dict[Precision, CheckpointSource] = {}
    by_folder: dict[Path, CheckpointSource] = {}
    for precision, folder in config.source_paths().items():
        key = folder.resolve()
        if key not in by_folder:
            where = (
                f"mixed_precision.{precision.path_key}"
                if config.mixed_precision.explicit_path(precision) is not None
                else "the model folder"
            )
            try:
                by_folder[key] = CheckpointSource(folder)
            except EnhancedError as e:
                raise EnhancedError(f"{where} ({precision}): {e.msg}", culprit=e.culprit) from e
        sources[precision] = by_folder[key]
    return SourceSet(sources)
