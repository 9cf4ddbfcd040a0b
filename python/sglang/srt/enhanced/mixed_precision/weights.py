"""Stream the weights of a load plan as ``(logical name, decoded tensor)`` pairs.

Weights are read file by file in checkpoint order (each file is visited once and
files no planned weight lives in are never opened). The stored parts of a weight
are read onto the target device and decoded there, so on a GPU the dequantization
kernels run on the GPU. Only the weight being yielded is held, except on a GPU
when the decoder offers ``decode_many``: then the same-shape experts of one
layer's projection (``...experts.<i>.<proj>``) in one file are read together,
decoded in one batched call and yielded one by one.

Once the consumer has taken a weight (the generator resumes), the file pages its
stored parts were read from are released (:meth:`CheckpointSource.release_pages`,
in batches of ``RELEASE_BYTES`` and at the end of each file), so host memory beyond
the model itself stays at about ``RELEASE_BYTES`` plus one weight.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, PlanEntry, format_bytes
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource

logger = logging.getLogger(__name__)

__all__ = ["LoadStats", "iter_plan_weights"]

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<rest>.+)$")
_MAX_BATCH = 512
# File pages of consumed weights are released once this many bytes have been read.
RELEASE_BYTES = 32 << 20


@dataclass
class LoadStats:
    """Counts of what a load read and produced, per precision."""

    tensors: dict[Precision, int] = field(default_factory=dict)
    bytes_on_disk: dict[Precision, int] = field(default_factory=dict)
    bytes_loaded: dict[Precision, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, precision: Precision, bytes_on_disk: int, bytes_loaded: int) -> None:
        """One weight read and yielded decoded."""
        self.count(precision)
        self.add_part(precision, bytes_on_disk, bytes_loaded)

    def count(self, precision: Precision) -> None:
        self.tensors[precision] = self.tensors.get(precision, 0) + 1

    def add_part(self, precision: Precision, bytes_on_disk: int, bytes_loaded: int) -> None:
        self.bytes_on_disk[precision] = self.bytes_on_disk.get(precision, 0) + bytes_on_disk
        self.bytes_loaded[precision] = self.bytes_loaded.get(precision, 0) + bytes_loaded

    @property
    def total_tensors(self) -> int:
        return sum(self.tensors.values())

    def summary_line(self, in_memory: Mapping[str, int] | None = None) -> str:
        """One line for the log: totals, then tensors and bytes per precision.

        ``in_memory`` (bytes per precision name, as served) replaces the bytes the
        stream yielded, which for packed weights are not yet cut to this rank's piece.
        """
        held = {p: (in_memory.get(str(p), 0) if in_memory is not None else self.bytes_loaded.get(p, 0))
                for p in Precision}
        label = "in memory" if in_memory is not None else "loaded"
        parts = [
            f"{p}: {self.tensors[p]} tensors, {format_bytes(self.bytes_on_disk.get(p, 0))} on disk, "
            f"{format_bytes(held[p])} {label}"
            for p in Precision
            if p in self.tensors
        ]
        return (
            f"loaded {self.total_tensors} weights ({format_bytes(sum(self.bytes_on_disk.values()))} on disk, "
            f"{format_bytes(sum(held.values()))} {label}) in {self.seconds:.2f} s"
            + (f" [{'; '.join(parts)}]" if parts else "")
        )

    def as_dict(self) -> dict[str, object]:
        """Plain-data form (precision names as keys)."""
        return {
            "tensors": {str(p): n for p, n in self.tensors.items()},
            "bytes_on_disk": {str(p): n for p, n in self.bytes_on_disk.items()},
            "bytes_loaded": {str(p): n for p, n in self.bytes_loaded.items()},
            "seconds": self.seconds,
        }


def iter_plan_weights(
    plan: LoadPlan,
    sources: Mapping[Precision, CheckpointSource],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    stats: LoadStats | None = None,
    progress: bool = True,
    batch_experts: bool | None = None,
    packed: Mapping[str, tuple[str, ...]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(logical name, tensor in dtype on device)`` for every plan entry.

    Entries named in ``packed`` are not decoded: the stored parts listed for them are
    yielded as stored, ``(stored name, tensor)``, for packed serving methods to keep.

    ``batch_experts`` turns batched expert decoding on or off; by default it is on
    for non-CPU devices (on the CPU it would raise peak host memory).

    ``stats`` (if given) is updated as weights are yielded; its ``seconds`` covers
    the whole iteration, consumer time included.
    """
    device = torch.device(device)
    batched = device.type != "cpu" if batch_experts is None else batch_experts
    packed = packed or {}
    stats = stats if stats is not None else LoadStats()
    start = time.perf_counter()
    bar = tqdm(total=len(plan), disable=not progress, unit="weight", desc="Loading weights", leave=False)
    try:
        for source, entries in _schedule(plan, sources):
            decoder = source.decoder
            decode_many = getattr(decoder, "decode_many", None) if batched else None
            for unit in _units(entries, source, decode_many is not None, packed):
                if unit[0].name in packed:
                    entry = unit[0]
                    for part in packed[entry.name]:
                        tensor = source.read(part, device)
                        stats.add_part(entry.precision, source.nbytes(part), tensor.numel() * tensor.element_size())
                        yield part, tensor
                        del tensor
                    stats.count(entry.precision)
                    bar.update(1)
                    source.release_pages(RELEASE_BYTES)
                    continue
                parts_list = [{p: source.read(p, device) for p in e.stored_parts} for e in unit]
                if len(unit) == 1:
                    outs = [decoder.decode(unit[0].name, parts_list[0], dtype)]
                else:
                    outs = list(decode_many([e.name for e in unit], parts_list, dtype))  # type: ignore[misc]
                    if len(outs) != len(unit):
                        raise EnhancedError(
                            f"decode_many returned {len(outs)} tensors for {len(unit)} weights",
                            culprit=unit[0].name,
                        )
                del parts_list
                outs.reverse()
                for entry in unit:
                    tensor = outs.pop()
                    _check(entry, tensor)
                    stats.add(entry.precision, entry.bytes_on_disk, tensor.numel() * tensor.element_size())
                    bar.update(1)
                    yield entry.name, tensor
                    del tensor
                    source.release_pages(RELEASE_BYTES)
            source.release_pages()
    finally:
        bar.close()
        stats.seconds += time.perf_counter() - start


def _check(entry: PlanEntry, tensor: torch.Tensor) -> None:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes != entry.bytes_loaded:
        logger.debug("%s: decoded %d bytes, plan expected %d", entry.name, nbytes, entry.bytes_loaded)


def _schedule(
    plan: LoadPlan, sources: Mapping[Precision, CheckpointSource]
) -> list[tuple[CheckpointSource, list[PlanEntry]]]:
    """Plan entries grouped by (source, file of their first part), each group in checkpoint order.

    Sources come in ``Precision`` order (precisions sharing a folder share its files),
    then the source's file order.
    """
    source_order: dict[int, int] = {}
    for precision in Precision:
        if precision in sources:
            source_order.setdefault(id(sources[precision]), len(source_order))
    file_order: dict[int, dict[object, int]] = {}
    groups: dict[tuple[int, int], tuple[CheckpointSource, list[PlanEntry]]] = {}
    for entry in plan.entries:
        source = sources.get(entry.precision)
        if source is None:
            raise EnhancedError(f"no checkpoint given for precision {entry.precision}", culprit=entry.name)
        order = file_order.setdefault(id(source), {f: i for i, f in enumerate(source.files)})
        key = (source_order[id(source)], order[source.file_of(entry.stored_parts[0])])
        groups.setdefault(key, (source, []))[1].append(entry)
    out = []
    for _, (source, entries) in sorted(groups.items(), key=lambda kv: kv[0]):
        entries.sort(key=lambda e: source.info(e.stored_parts[0]).offset)
        out.append((source, entries))
    return out


def _units(
    entries: list[PlanEntry], source: CheckpointSource, batch: bool, packed: Mapping[str, tuple[str, ...]]
) -> list[list[PlanEntry]]:
    """Single weights, or (when ``batch``) same-shape experts of one projection grouped at the first one's place."""
    if not batch:
        return [[e] for e in entries]
    units: list[list[PlanEntry]] = []
    open_groups: dict[tuple[object, ...], list[PlanEntry]] = {}
    for e in entries:
        m = _EXPERT.match(e.name) if e.name not in packed else None
        if m is None:
            units.append([e])
            continue
        shapes = tuple(
            (p.removeprefix(f"{m['prefix']}.{m['index']}."), source.shape(p), source.info(p).dtype)
            for p in e.stored_parts
        )
        key = (m["prefix"], m["rest"], shapes)
        group = open_groups.get(key)
        if group is None or len(group) >= _MAX_BATCH:
            group = []
            open_groups[key] = group
            units.append(group)
        group.append(e)
    return units
