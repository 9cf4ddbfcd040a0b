"""What each routed expert costs in each precision: bytes as stored, and decoding error.

An expert is the set of weights ``<prefix>.layers.<L>.<...>experts.<E>.<proj>.weight``
(``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w2``/``w3``); shared experts
(no index after ``experts``) are not routed experts. Per expert and precision:

* **bytes**: the stored bytes of all its projections in that precision's checkpoint
  (packed tensors and their scales: what packed serving keeps in memory);
* **error**: the mean over its projections of the relative Frobenius error
  ``||W_p - W|| / ||W||`` of the decoded weight ``W_p`` against the reference
  (unquantized) weight ``W``, both in float32.

A precision whose checkpoint lacks any projection of an expert is not offered for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource

__all__ = ["ExpertCost", "ExpertKey", "ExpertWeights", "find_experts", "measure_expert_costs"]

_EXPERT_WEIGHT = re.compile(
    r"^(?P<experts>.*?\blayers\.(?P<layer>\d+)\.(?:.+\.)?experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$"
)

ExpertKey = tuple[int, int]  # (layer id, expert id)


@dataclass(frozen=True)
class ExpertWeights:
    """The weights of one routed expert."""

    layer: int
    expert: int
    prefix: str  # e.g. "model.layers.3.mlp.experts"
    names: tuple[str, ...]  # its projections' weight names, in model order


@dataclass(frozen=True)
class ExpertCost:
    """One precision's bytes and error for one expert."""

    nbytes: int
    error: float


def find_experts(weight_names: Iterable[str]) -> dict[ExpertKey, ExpertWeights]:
    """Routed experts among ``weight_names``, keyed by ``(layer, expert)``, in name order."""
    found: dict[ExpertKey, tuple[str, list[str]]] = {}
    for name in weight_names:
        m = _EXPERT_WEIGHT.match(name)
        if m is None:
            continue
        key = (int(m["layer"]), int(m["expert"]))
        prefix, names = found.setdefault(key, (m["experts"], []))
        if prefix != m["experts"]:
            raise EnhancedError(f"expert weights under two prefixes: {prefix} and {m['experts']}", culprit=name)
        names.append(name)
    return {key: ExpertWeights(key[0], key[1], prefix, tuple(names)) for key, (prefix, names) in sorted(found.items())}


def _decoded(source: CheckpointSource, name: str) -> torch.Tensor:
    parts = {p: source.read(p) for p in source.logical_names()[name]}
    return source.decoder.decode(name, parts, torch.float32).to(torch.float32)


def measure_expert_costs(
    experts: Mapping[ExpertKey, ExpertWeights],
    sources: Mapping[Precision, CheckpointSource],
    reference: Precision,
) -> dict[ExpertKey, dict[Precision, ExpertCost]]:
    """Bytes and error of every expert in every precision of ``sources`` that holds it.

    ``reference`` names the unquantized precision the errors are measured against.
    """
    if reference not in sources:
        raise EnhancedError(f"no checkpoint for the reference precision {reference}", culprit=str(reference))
    ref_source = sources[reference]
    costs: dict[ExpertKey, dict[Precision, ExpertCost]] = {}
    for key, expert in experts.items():
        references = {name: _decoded(ref_source, name) for name in expert.names}
        per_precision: dict[Precision, ExpertCost] = {}
        for precision, source in sources.items():
            logical = source.logical_names()
            if any(name not in logical for name in expert.names):
                continue
            nbytes, errors = 0, []
            for name in expert.names:
                nbytes += sum(source.nbytes(p) for p in logical[name])
                ref = references[name]
                got = ref if source is ref_source else _decoded(source, name)
                if got.shape != ref.shape:
                    raise EnhancedError(
                        f"{precision} weight has shape {tuple(got.shape)}, the {reference} one {tuple(ref.shape)}",
                        culprit=name,
                    )
                norm = float(torch.linalg.vector_norm(ref.double()))
                diff = float(torch.linalg.vector_norm(got.double() - ref.double()))
                errors.append(diff / norm if norm > 0 else diff)
            per_precision[precision] = ExpertCost(nbytes, sum(errors) / len(errors))
            source.release_pages()
        costs[key] = per_precision
    return costs
