"""Which checkpoint each weight is read from: a pure function of config and tensor indexes.

Rules are the keys of ``mixed_precision.weight_mapping``:

* an **exact** weight name (no ``*``, ``?`` or ``[``, no ``re:`` prefix);
* a **glob** (``fnmatch``, case-sensitive; ``*`` also matches dots);
* a **regex**, written ``re:<pattern>``, which must match the whole name.

The most specific matching rule wins:

1. an exact name beats every pattern;
2. patterns rank by their number of *literal characters*, more wins. In a glob,
   every character except ``*``, ``?`` and a ``[...]`` class is literal. In a
   regex, a character is literal when it is outside any group ``(...)`` or class
   ``[...]``, is not a metacharacter (``.^$*+?{}|``), is not followed by ``?``,
   ``*`` or ``{``, and, if escaped, is punctuation (``\\.`` counts, ``\\d`` does not);
   with a top-level ``|`` the branch with the fewest literals counts;
3. at equal literal count a glob beats a regex;
4. equally ranked rules that match one weight with different precisions are an
   error naming the weight and both rules (with the same precision, the first
   listed is recorded).

Weights no rule matches take the default precision (rule ``"(default)"``). Every
rule must match at least one weight of the model, and every weight must exist in
the checkpoint of its precision.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from sglang.srt.enhanced.config import EnhancedConfig, Precision, mapping_key_path
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource

__all__ = [
    "DEFAULT_RULE",
    "LoadPlan",
    "PlanEntry",
    "PrecisionTotals",
    "Rule",
    "RuleKind",
    "build_plan",
    "format_bytes",
    "format_plan",
    "parse_rules",
]

DEFAULT_RULE = "(default)"


class RuleKind(enum.IntEnum):
    """Rule kinds; at equal literal count a higher value ranks first."""

    REGEX = 0
    GLOB = 1
    EXACT = 2


@dataclass(frozen=True)
class Rule:
    """One ``weight_mapping`` entry, classified and compiled."""

    key: str
    precision: Precision
    kind: RuleKind
    literal_count: int
    pattern: re.Pattern[str] | None

    @classmethod
    def parse(cls, key: str, precision: Precision) -> Rule:
        if key.startswith("re:"):
            try:
                pattern = re.compile(key[3:])
            except re.error as e:
                raise EnhancedError(f"invalid regular expression: {e}", culprit=mapping_key_path(key)) from e
            return cls(key, precision, RuleKind.REGEX, regex_literal_count(key[3:]), pattern)
        if any(c in key for c in "*?["):
            return cls(
                key, precision, RuleKind.GLOB, glob_literal_count(key), re.compile(fnmatch.translate(key))
            )
        return cls(key, precision, RuleKind.EXACT, len(key), None)

    @property
    def rank(self) -> tuple[int, int, int]:
        """Sort key: higher is more specific."""
        return (int(self.kind == RuleKind.EXACT), self.literal_count, int(self.kind))

    def matches(self, name: str) -> bool:
        if self.pattern is None:
            return name == self.key
        return self.pattern.fullmatch(name) is not None


def glob_literal_count(glob: str) -> int:
    """Characters of a glob other than ``*``, ``?`` and ``[...]`` classes."""
    count, i = 0, 0
    while i < len(glob):
        c = glob[i]
        if c in "*?":
            i += 1
            continue
        if c == "[":
            end = _class_end(glob, i)
            if end is not None:
                i = end + 1
                continue
        count += 1
        i += 1
    return count


def regex_literal_count(regex: str) -> int:
    """Literal characters of a regex, as defined in the module docstring."""
    branches = [0]
    depth, i = 0, 0
    last_counted = False
    while i < len(regex):
        c = regex[i]
        counted = False
        if c == "\\":
            nxt = regex[i + 1 : i + 2]
            counted = depth == 0 and bool(nxt) and not nxt.isalnum()
            i += 2
        elif c == "[":
            end = _class_end(regex, i)
            i = (end if end is not None else len(regex) - 1) + 1
        elif c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth = max(depth - 1, 0)
            i += 1
        elif c in "*?{":
            if last_counted:
                branches[-1] -= 1
            if c == "{":
                close = regex.find("}", i)
                i = close + 1 if close != -1 else i + 1
            else:
                i += 1
        elif c == "|":
            if depth == 0:
                branches.append(0)
            i += 1
        elif c in ".^$+":
            i += 1
        else:
            counted = depth == 0
            i += 1
        if counted:
            branches[-1] += 1
        last_counted = counted
    return min(branches)


def _class_end(text: str, start: int) -> int | None:
    """Index of the ``]`` closing the class opened at ``start`` (a leading ``]`` or ``^]`` is literal)."""
    i = start + 1
    if i < len(text) and text[i] in "!^":
        i += 1
    if i < len(text) and text[i] == "]":
        i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "]":
            return i
        i += 1
    return None


def parse_rules(weight_mapping: Mapping[str, Precision]) -> list[Rule]:
    """The mapping's rules in file order."""
    return [Rule.parse(key, Precision(precision)) for key, precision in weight_mapping.items()]


@dataclass(frozen=True)
class PlanEntry:
    """How one logical weight is loaded."""

    name: str
    precision: Precision
    rule: str
    stored_parts: tuple[str, ...]
    bytes_on_disk: int
    bytes_loaded: int


@dataclass(frozen=True)
class PrecisionTotals:
    """Tensor count and bytes of one precision."""

    tensors: int = 0
    bytes_on_disk: int = 0
    bytes_loaded: int = 0

    def __add__(self, other: PrecisionTotals) -> PrecisionTotals:
        return PrecisionTotals(
            self.tensors + other.tensors,
            self.bytes_on_disk + other.bytes_on_disk,
            self.bytes_loaded + other.bytes_loaded,
        )


@dataclass(frozen=True)
class LoadPlan:
    """Every weight to load, in model order, with the serving ``dtype`` and source folders."""

    entries: tuple[PlanEntry, ...]
    dtype: torch.dtype
    folders: tuple[tuple[Precision, Path], ...] = ()

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    @cached_property
    def _by_name(self) -> dict[str, PlanEntry]:
        return {e.name: e for e in self.entries}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def entry(self, name: str) -> PlanEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise EnhancedError("weight is not in the load plan", culprit=name) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def summary(self) -> dict[Precision, PrecisionTotals]:
        """Per precision (in ``Precision`` order): tensors, bytes on disk, bytes once loaded in ``dtype``."""
        totals: dict[Precision, PrecisionTotals] = {}
        for e in self.entries:
            totals[e.precision] = totals.get(e.precision, PrecisionTotals()) + PrecisionTotals(
                1, e.bytes_on_disk, e.bytes_loaded
            )
        return {p: totals[p] for p in Precision if p in totals}

    def total(self) -> PrecisionTotals:
        return sum(self.summary().values(), PrecisionTotals())


def build_plan(
    config: EnhancedConfig,
    sources: Mapping[Precision, CheckpointSource],
    model_weights: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> LoadPlan:
    """Decide the precision, rule and stored tensors of every model weight.

    ``model_weights`` defaults to the logical names of the model folder's checkpoint
    (else the default precision's). ``dtype`` (the serving dtype, for
    ``bytes_loaded``) defaults to ``config.inference.dtype``. Raises ``EnhancedError``
    for rule ties, rules matching no weight, unmapped weights without a default, and
    weights missing from their checkpoint.
    """
    dtype = dtype if dtype is not None else config.inference.torch_dtype()
    rules = parse_rules(config.mixed_precision.weight_mapping)
    exact = {r.key: r for r in rules if r.kind == RuleKind.EXACT}
    patterns = [r for r in rules if r.kind != RuleKind.EXACT]
    default = config.default_precision
    if model_weights is None:
        model_weights = list(_model_source(config, sources).logical_names())
    names = list(dict.fromkeys(model_weights))

    matched: set[str] = set()
    entries: list[PlanEntry] = []
    for name in names:
        candidates = [r for r in patterns if r.matches(name)]
        matched.update(r.key for r in candidates)
        if name in exact:
            matched.add(name)
            winner = exact[name]
        elif candidates:
            winner = _pick(name, candidates)
        else:
            winner = None
        precision = winner.precision if winner is not None else default
        rule = winner.key if winner is not None else DEFAULT_RULE
        if precision is None:
            raise EnhancedError(
                "no rule maps this weight and there is no default precision (set mixed_precision.default)",
                culprit=name,
            )
        entries.append(_entry(name, precision, rule, sources, dtype))

    unmatched = [r.key for r in rules if r.key not in matched]
    if unmatched:
        raise EnhancedError(_unmatched_message(unmatched, names), culprit=mapping_key_path(unmatched[0]))

    folders = tuple((p, sources[p].folder) for p in Precision if p in sources)
    return LoadPlan(tuple(entries), dtype, folders)


def _pick(name: str, candidates: list[Rule]) -> Rule:
    best = max(r.rank for r in candidates)
    top = [r for r in candidates if r.rank == best]
    for other in top[1:]:
        if other.precision != top[0].precision:
            raise EnhancedError(
                f"rules {top[0].key!r} ({top[0].precision}) and {other.key!r} ({other.precision}) match this "
                "weight with equal rank; make one more specific",
                culprit=name,
            )
    return top[0]


def _entry(
    name: str,
    precision: Precision,
    rule: str,
    sources: Mapping[Precision, CheckpointSource],
    dtype: torch.dtype,
) -> PlanEntry:
    source = sources.get(precision)
    if source is None:
        raise EnhancedError(f"no checkpoint opened for precision {precision} (rule {rule!r})", culprit=name)
    parts = source.logical_names().get(name)
    if parts is None:
        raise EnhancedError(
            f"rule {rule!r} maps this weight to {precision}, but the {precision} checkpoint {source.folder} "
            f"({source.decoder.format_name}) has no such weight",
            culprit=name,
        )
    shapes = {p: source.shape(p) for p in parts}
    return PlanEntry(
        name=name,
        precision=precision,
        rule=rule,
        stored_parts=tuple(parts),
        bytes_on_disk=sum(source.nbytes(p) for p in parts),
        bytes_loaded=int(source.decoder.decoded_nbytes(name, shapes, dtype)),
    )


def _model_source(config: EnhancedConfig, sources: Mapping[Precision, CheckpointSource]) -> CheckpointSource:
    if config.model_path is not None:
        model = config.model_path.resolve()
        for source in sources.values():
            if source.folder.resolve() == model:
                return source
    default = config.default_precision
    if default is not None and default in sources:
        return sources[default]
    distinct = list({id(s): s for s in sources.values()}.values())
    if len(distinct) == 1:
        return distinct[0]
    raise EnhancedError(
        "cannot tell which checkpoint lists the model's weights: give the model folder or a default precision",
        culprit="mixed_precision.default",
    )


def _unmatched_message(keys: list[str], names: list[str]) -> str:
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, names, n=1) if not key.startswith("re:") else []
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"weight_mapping rule matches no weight of the model: {', '.join(parts)}"


# -- reporting -------------------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_plan(plan: LoadPlan, *, per_tensor: bool = False) -> str:
    """A text report of the plan: totals per precision, tensors per rule, optionally every tensor."""
    folders = dict(plan.folders)
    summary = plan.summary()
    total = plan.total()
    dtype = str(plan.dtype).removeprefix("torch.")
    rows = [
        [
            str(p),
            str(folders.get(p, "")),
            str(t.tensors),
            format_bytes(t.bytes_on_disk),
            format_bytes(t.bytes_loaded),
        ]
        for p, t in summary.items()
    ]
    rows.append(
        ["total", "", str(total.tensors), format_bytes(total.bytes_on_disk), format_bytes(total.bytes_loaded)]
    )
    out = [f"Load plan: {total.tensors} weights, decoded to {dtype}", ""]
    out += _table(["precision", "folder", "tensors", "on disk", f"as {dtype}"], rows, {2, 3, 4})

    by_rule: dict[tuple[str, Precision], PrecisionTotals] = {}
    for e in plan.entries:
        key = (e.rule, e.precision)
        by_rule[key] = by_rule.get(key, PrecisionTotals()) + PrecisionTotals(
            1, e.bytes_on_disk, e.bytes_loaded
        )
    rule_rows = [
        [rule, str(p), str(t.tensors), format_bytes(t.bytes_on_disk), format_bytes(t.bytes_loaded)]
        for (rule, p), t in by_rule.items()
    ]
    out += ["", *_table(["rule", "precision", "tensors", "on disk", f"as {dtype}"], rule_rows, {2, 3, 4})]
    if per_tensor:
        tensor_rows = [
            [e.name, str(e.precision), e.rule, format_bytes(e.bytes_on_disk), format_bytes(e.bytes_loaded)]
            for e in plan.entries
        ]
        out += ["", *_table(["weight", "precision", "rule", "on disk", f"as {dtype}"], tensor_rows, {3, 4})]
    return "\n".join(out)
