"""Per-expert precision from expert statistics and a memory budget.

:class:`PrecisionPlanner` opens the checkpoints once, finds the routed experts of the
model and measures each expert's bytes and error per precision
(:mod:`.expert_costs`). :meth:`PrecisionPlanner.plan` then takes the tokens each expert
processed (the tracker's statistics) and a budget for all weights as stored, and chooses
every expert's precision (:mod:`.expert_budget`):

* ``optimal``: the exact minimum of ``sum over experts of token share x error``, where an
  expert's token share is its fraction of its layer's routed tokens;
* ``random``: the same budget spent on experts taken in random order (a baseline);
* ``uniform``: every expert at its cheapest precision.

Weights that are not routed experts are fixed: ``keep`` rules (``PATTERN=PRECISION``, the
config's rule syntax) choose theirs, the rest take the reference (unquantized) precision.
Their bytes count against the budget. The result renders as a mixed-precision config
(:meth:`ExpertPlan.to_yaml`): per layer, a glob for the precision most of its experts
share and exact names for the others; the config is checked by building its load plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.expert_budget import (
    Option,
    cheapest,
    expected_error,
    random_fill,
    solve_budget,
)
from sglang.srt.enhanced.mixed_precision.expert_costs import (
    ExpertCost,
    ExpertKey,
    ExpertWeights,
    find_experts,
    measure_expert_costs,
)
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, build_plan, format_bytes, parse_rules
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource, SourceSet, open_sources

__all__ = ["STRATEGIES", "ExpertPlan", "PrecisionPlanner", "parse_keep", "tokens_from_stats"]

STRATEGIES = ("optimal", "random", "uniform")


def tokens_from_stats(stats: Mapping[str, Any]) -> dict[ExpertKey, int]:
    """Tokens per ``(layer, expert)`` from the tracker's statistics (``/expert_stats`` JSON)."""
    if not isinstance(stats, Mapping):
        raise EnhancedError("expert statistics must be a JSON object", culprit="stats")
    tokens: dict[ExpertKey, int] = {}
    if isinstance(stats.get("expert_stats"), Mapping):
        for key, entry in stats["expert_stats"].items():
            try:
                tokens[(int(entry["layer_id"]), int(entry["expert_id"]))] = int(entry["total_tokens_processed"])
            except (KeyError, TypeError, ValueError):
                raise EnhancedError(
                    "entry needs integer layer_id, expert_id and total_tokens_processed", culprit=f"expert_stats.{key}"
                ) from None
    elif isinstance(stats.get("layer_stats"), Mapping):
        for layer, entry in stats["layer_stats"].items():
            experts = entry.get("experts") if isinstance(entry, Mapping) else None
            if not isinstance(experts, Mapping):
                raise EnhancedError("layer entry without experts", culprit=f"layer_stats.{layer}")
            for expert, e in experts.items():
                try:
                    tokens[(int(layer), int(expert))] = int(e["total_tokens_processed"])
                except (KeyError, TypeError, ValueError):
                    raise EnhancedError(
                        "expert entry needs an integer total_tokens_processed",
                        culprit=f"layer_stats.{layer}.experts.{expert}",
                    ) from None
    else:
        raise EnhancedError("no expert_stats or layer_stats in the statistics", culprit="stats")
    negative = [k for k, v in tokens.items() if v < 0]
    if negative:
        raise EnhancedError("negative token count", culprit=f"layer_{negative[0][0]}_expert_{negative[0][1]}")
    return tokens


def parse_keep(items: Sequence[str]) -> dict[str, Precision]:
    """``["PATTERN=PRECISION", ...]`` -> weight_mapping rules (the last ``=`` splits)."""
    rules: dict[str, Precision] = {}
    for item in items:
        pattern, sep, precision = item.rpartition("=")
        if not sep or not pattern:
            raise EnhancedError("--keep takes PATTERN=PRECISION", culprit=item)
        try:
            rules[pattern] = Precision(precision.strip().lower())
        except ValueError:
            raise EnhancedError(
                f"unknown precision {precision!r}; valid: {[p.value for p in Precision]}", culprit=item
            ) from None
    return rules


@dataclass
class ExpertPlan:
    """A chosen precision per expert, with what it costs."""

    strategy: str
    budget: int
    choice: dict[ExpertKey, Precision]
    expert_bytes: dict[Precision, int]
    fixed_bytes: int
    expected_error: float
    baselines: dict[str, float]
    config: dict[str, Any] = field(repr=False)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(self.expert_bytes.values())

    def to_yaml(self) -> str:
        """The mixed-precision config that serves this plan, with a comment header."""
        counts = {p: sum(1 for c in self.choice.values() if c == p) for p in self.expert_bytes}
        header = [
            f"# Per-expert precision ({self.strategy}) for a budget of {format_bytes(self.budget)}:",
            f"# weights as stored {format_bytes(self.total_bytes)} "
            f"(experts {format_bytes(sum(self.expert_bytes.values()))}, other weights {format_bytes(self.fixed_bytes)}).",
            "# experts: " + ", ".join(f"{counts[p]} {p}" for p in self.expert_bytes),
            f"# expected relative error per routed token: {self.expected_error:.6g} "
            + " ".join(f"({name}: {value:.6g})" for name, value in self.baselines.items()),
        ]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.config, sort_keys=False, width=1000)

    def report(self) -> str:
        """A text table: experts and bytes per precision, and the expected error against the baselines."""
        lines = [f"{'precision':<12}{'experts':>9}{'bytes':>14}"]
        for precision, nbytes in self.expert_bytes.items():
            n = sum(1 for c in self.choice.values() if c == precision)
            lines.append(f"{str(precision):<12}{n:>9}{format_bytes(nbytes):>14}")
        lines.append(f"{'other':<12}{'':>9}{format_bytes(self.fixed_bytes):>14}")
        lines.append(f"{'total':<12}{len(self.choice):>9}{format_bytes(self.total_bytes):>14}"
                     f"   (budget {format_bytes(self.budget)})")
        lines.append("")
        lines.append("expected relative error per routed token (token share x error, mean over layers):")
        lines.append(f"  {self.strategy:<22}{self.expected_error:.6g}")
        for name, value in self.baselines.items():
            lines.append(f"  {name:<22}{value:.6g}")
        return "\n".join(lines)


class PrecisionPlanner:
    """Expert costs of one model's checkpoints, measured once; plans for any statistics and budget."""

    def __init__(
        self,
        model_path: str | Path,
        folders: Mapping[Precision, str | Path],
        *,
        keep: Mapping[str, Precision] | None = None,
        reference: Precision = Precision.BF16,
    ) -> None:
        self.model_path = Path(model_path).resolve()
        self.reference = reference
        self.folders = {p: Path(f).resolve() for p, f in folders.items()}
        self.folders.setdefault(reference, self.model_path)
        self.keep = dict(keep or {})
        for p in self.keep.values():
            if p not in self.folders:
                raise EnhancedError(f"a --keep rule uses {p}, which has no folder", culprit=str(p))
        with _opened(self._config({}), self.folders) as sources:
            self._prepare(sources)

    # -- setup ------------------------------------------------------------------------------------

    def _prepare(self, sources: Mapping[Precision, CheckpointSource]) -> None:
        model_names = list(sources[self.reference].logical_names())
        self.experts: dict[ExpertKey, ExpertWeights] = find_experts(model_names)
        if not self.experts:
            raise EnhancedError("the model has no routed expert weights", culprit=str(self.model_path))
        expert_names = {n for e in self.experts.values() for n in e.names}
        for rule in parse_rules(self.keep):
            hit = next((n for n in sorted(expert_names) if rule.matches(n)), None)
            if hit is not None:
                raise EnhancedError(
                    f"--keep rule matches the routed expert weight {hit}; experts are chosen by the plan",
                    culprit=rule.key,
                )
        costs = measure_expert_costs(self.experts, sources, self.reference)
        self.keys: list[ExpertKey] = list(self.experts)
        self.precisions: list[list[Precision]] = []
        self.options: list[list[Option]] = []
        for key in self.keys:
            offered = sorted(costs[key].items(), key=lambda kv: list(Precision).index(kv[0]))
            self.precisions.append([p for p, _ in offered])
            self.options.append([_option(p, c) for p, c in offered])
        smallest = {key: self.precisions[i][j] for i, (key, j) in enumerate(zip(self.keys, cheapest(self.options), strict=True))}
        plan = self._load_plan(smallest)
        self.fixed_bytes = sum(e.bytes_on_disk for e in plan.entries if e.name not in expert_names)

    def _config(self, mapping: Mapping[str, Precision]) -> EnhancedConfig:
        return EnhancedConfig.from_mapping(self._config_data(mapping), model_path=self.model_path)

    def _config_data(self, mapping: Mapping[str, Precision]) -> dict[str, Any]:
        paths = {p.path_key: str(folder) for p, folder in sorted(self.folders.items(), key=lambda kv: kv[0].value)}
        rules = {**{k: str(p) for k, p in self.keep.items()}, **{k: str(p) for k, p in mapping.items()}}
        return {"mixed_precision": {**paths, "default": str(self.reference), "weight_mapping": rules}}

    def _mapping(self, choice: Mapping[ExpertKey, Precision]) -> dict[str, Precision]:
        """Per layer, a glob for its most common precision and exact names for the other experts."""
        by_prefix: dict[str, list[ExpertKey]] = {}
        for key in self.keys:
            by_prefix.setdefault(self.experts[key].prefix, []).append(key)
        mapping: dict[str, Precision] = {}
        for prefix, keys in by_prefix.items():
            counts: dict[Precision, int] = {}
            for key in keys:
                counts[choice[key]] = counts.get(choice[key], 0) + 1
            common = max(counts, key=lambda p: (counts[p], -list(Precision).index(p)))
            mapping[f"{prefix}.*"] = common
            for key in keys:
                if choice[key] != common:
                    for name in self.experts[key].names:
                        mapping[name] = choice[key]
        return mapping

    def _load_plan(self, choice: Mapping[ExpertKey, Precision]) -> LoadPlan:
        config = self._config(self._mapping(choice))
        with _opened(config) as sources:
            return build_plan(config, sources)

    # -- planning ---------------------------------------------------------------------------------

    @property
    def minimum_bytes(self) -> int:
        """All weights as stored with every expert at its cheapest precision."""
        return self.fixed_bytes + sum(min(o.nbytes for o in opts) for opts in self.options)

    def shares(self, tokens: Mapping[ExpertKey, int]) -> list[float]:
        """Each expert's share of its layer's tokens, divided by the number of layers (so they sum to 1)."""
        unknown = sorted(k for k in tokens if k not in self.experts)
        if unknown:
            names = ", ".join(f"layer_{layer}_expert_{e}" for layer, e in unknown[:8])
            raise EnhancedError(
                f"the statistics name {len(unknown)} expert(s) the model does not have: {names}",
                culprit=f"layer_{unknown[0][0]}_expert_{unknown[0][1]}",
            )
        layer_total: dict[int, int] = {}
        for (layer, _), n in tokens.items():
            layer_total[layer] = layer_total.get(layer, 0) + n
        layers = {layer for layer, _ in self.keys}
        return [
            tokens.get(key, 0) / layer_total[key[0]] / len(layers) if layer_total.get(key[0]) else 0.0
            for key in self.keys
        ]

    def plan(
        self, tokens: Mapping[ExpertKey, int], budget: int, *, strategy: str = "optimal", seed: int = 0
    ) -> ExpertPlan:
        """Choose every expert's precision so all weights fit ``budget`` bytes as stored."""
        if strategy not in STRATEGIES:
            raise EnhancedError(f"unknown strategy; valid: {list(STRATEGIES)}", culprit=strategy)
        if budget < self.minimum_bytes:
            raise EnhancedError(
                f"the budget {format_bytes(budget)} is below the smallest size of this model: "
                f"{format_bytes(self.minimum_bytes)} ({self.minimum_bytes} bytes) with every expert at its "
                "cheapest precision",
                culprit="budget",
            )
        weights = self.shares(tokens)
        capacity = budget - self.fixed_bytes
        picks = {
            "optimal": lambda: solve_budget(weights, self.options, capacity),
            "random": lambda: random_fill(self.options, capacity, seed),
            "uniform": lambda: cheapest(self.options),
        }
        indexes = {name: pick() for name, pick in picks.items()}
        chosen = indexes[strategy]
        choice = {key: self.precisions[i][j] for i, (key, j) in enumerate(zip(self.keys, chosen, strict=True))}
        expert_bytes: dict[Precision, int] = {}
        for i, j in enumerate(chosen):
            p = self.precisions[i][j]
            expert_bytes[p] = expert_bytes.get(p, 0) + self.options[i][j].nbytes
        expert_bytes = {p: expert_bytes[p] for p in Precision if p in expert_bytes}
        mapping = self._mapping(choice)
        self._check_served(choice)
        labels = {"optimal": "optimal", "random": f"random (seed {seed})", "uniform": "uniform cheapest"}
        return ExpertPlan(
            strategy=labels[strategy],
            budget=budget,
            choice=choice,
            expert_bytes=expert_bytes,
            fixed_bytes=self.fixed_bytes,
            expected_error=expected_error(weights, self.options, chosen),
            baselines={labels[n]: expected_error(weights, self.options, c) for n, c in indexes.items() if n != strategy},
            config=self._config_data(mapping),
        )

    def _check_served(self, choice: Mapping[ExpertKey, Precision]) -> None:
        """The rendered config's load plan gives every expert weight its chosen precision."""
        plan = self._load_plan(choice)
        for key, precision in choice.items():
            for name in self.experts[key].names:
                got = plan.entry(name).precision
                if got != precision:
                    raise EnhancedError(f"the rendered rules give {got}, the plan chose {precision}", culprit=name)


def _option(precision: Precision, cost: ExpertCost) -> Option:
    error = cost.error if math.isfinite(cost.error) else float("inf")
    return Option(str(precision), cost.nbytes, error)


@contextmanager
def _opened(
    config: EnhancedConfig, folders: Mapping[Precision, Path] | None = None
) -> Iterator[SourceSet]:
    """The config's sources, and with ``folders`` one source for each of those precisions too."""
    opened = open_sources(config)
    by_folder = {s.folder.resolve(): s for s in opened.values()}
    extra = {
        precision: by_folder.setdefault(folder.resolve(), CheckpointSource(folder))
        for precision, folder in (folders or {}).items()
        if precision not in opened
    }
    with SourceSet({**opened, **extra}) as sources:
        yield sources


def keep_rules_of(config: EnhancedConfig, reference: Precision = Precision.BF16) -> dict[str, Precision]:
    """Rules that give every non-expert weight the precision ``config`` gives it.

    The config's own rules that match no routed expert weight are kept as they are; any
    other weight whose precision they (with ``reference`` as the default) would change gets
    an exact rule.
    """
    with _opened(config) as sources:
        served = build_plan(config, sources)
    experts = {n for e in find_experts(served.names).values() for n in e.names}
    rules = {
        r.key: r.precision
        for r in parse_rules(config.mixed_precision.weight_mapping)
        if not any(r.matches(n) for n in experts)
    }
    trial = EnhancedConfig.from_mapping(
        {"mixed_precision": {**{p.path_key: str(f) for p, f in config.source_paths().items()},
                             **({reference.path_key: str(config.source_path(reference))}
                                if config.source_path(reference) else {}),
                             "default": str(reference),
                             "weight_mapping": {k: str(p) for k, p in rules.items()}}},
        model_path=config.model_path,
    )
    with _opened(trial) as sources:
        planned = build_plan(trial, sources)
    for entry in served.entries:
        if entry.name not in experts and planned.entry(entry.name).precision != entry.precision:
            rules[entry.name] = entry.precision
    return rules
