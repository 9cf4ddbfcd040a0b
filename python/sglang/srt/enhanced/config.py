"""The mixed-precision configuration file: typed, frozen models and ``from_yaml``.

The file has three sections::

    mixed_precision:
      fp16_path: /models/qwen-moe          # also bf16_path, fp32_path, fp8_path, int4_path
      default: int4                        # optional: precision of weights no rule maps
      serve: packed                        # packed (default) or decoded, see below
      weight_mapping:
        "model.layers.0.self_attn.q_proj.weight": fp16          # exact name
        "model.layers.*.mlp.experts.*": int4                     # glob
        're:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj\\.weight': fp8   # regex
    inference: {max_seq_length: 4096, max_batch_size: 32, dtype: bfloat16, device_map: auto}
    server: {host: 127.0.0.1, port: 8080, max_workers: 4}

A precision names the checkpoint a weight is read from, not the serving dtype.
With ``serve: packed`` (the default) the server keeps GPTQ and FP8 weights of its
Linear and MoE modules in their checkpoint form and multiplies them by kernels that
decode on the fly; every other weight (and everything with ``serve: decoded``) is
decoded to ``inference.dtype``. ``fp16``, ``bf16`` and ``fp32`` are
unquantized checkpoints, ``fp8`` an FP8 checkpoint (per-tensor, per-channel or
block scales), ``int4`` a GPTQ checkpoint. GPTQ checkpoints of 2, 3 or 8 bits are
also read through ``int4_path``: the bit width comes from the checkpoint's own
quantization config.

Paths are resolved against the config file's folder. When no ``fp16_path``,
``bf16_path`` or ``fp32_path`` is given, those precisions read the ``--model``
folder. Without ``default``, unmapped weights come from the first unquantized
source given explicitly (fp16, bf16, fp32 in that order), else from the model
folder, labelled by ``inference.dtype`` (``float16`` -> fp16, ``float32`` -> fp32,
otherwise bf16).

``mixed_precision`` rejects unknown keys. ``inference`` and ``server`` keep unknown
keys in ``unknown_keys`` so the launcher can warn about each one by name.

No environment variables are read.
"""

from __future__ import annotations

import enum
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sglang.srt.enhanced.errors import EnhancedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EnhancedConfig",
    "InferenceConfig",
    "MixedPrecisionConfig",
    "Precision",
    "ServerConfig",
    "mapping_key_path",
    "quote",
    "resolve_path",
]

# Limits on the configuration file: its size, and the number of values once YAML aliases
# are expanded (a few nested anchors can otherwise stand for billions of values).
MAX_CONFIG_BYTES = 8 << 20
MAX_EXPANDED_VALUES = 250_000
QUOTE_CHARS = 160


class Precision(str, enum.Enum):
    """Which checkpoint a weight is read from."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"
    FP8 = "fp8"
    INT4 = "int4"

    @property
    def path_key(self) -> str:
        """The ``mixed_precision`` key holding this precision's folder."""
        return f"{self.value}_path"

    @property
    def is_unquantized(self) -> bool:
        return self in _UNQUANTIZED

    def __str__(self) -> str:
        return self.value


_UNQUANTIZED = (Precision.FP16, Precision.BF16, Precision.FP32)

_DTYPE_ALIASES = {
    "auto": "auto",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

_SECTIONS = ("mixed_precision", "inference", "server")


def mapping_key_path(key: str) -> str:
    """YAML key path of one ``weight_mapping`` rule, used as an error culprit."""
    return f'mixed_precision.weight_mapping["{quote(key)}"]'


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``value`` as text (a bounded ``repr`` unless a string), cut to its first ``limit`` characters."""
    if isinstance(value, str):
        text = value
    else:
        short = reprlib.Repr()
        short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
        short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
        text = short.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def resolve_path(path: str | Path, culprit: str | None = None) -> Path:
    """``path`` made absolute with symlinks resolved; a symlink loop is an ``EnhancedError`` naming it."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # Python raises RuntimeError("Symlink loop ...") before 3.13
        raise EnhancedError(f"cannot resolve {path}: symlink loop or unreadable link ({e})",
                            culprit=culprit or str(path)) from None


def _parse_precision(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _KeepsUnknown(_Frozen):
    """A section whose unknown keys are kept (not rejected) in ``unknown_keys``."""

    unknown_keys: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_unknown(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        known = set(cls.model_fields) - {"unknown_keys"}
        kept = {k: v for k, v in data.items() if k in known}
        unknown = {str(k): v for k, v in data.items() if k not in known}
        if unknown:
            kept["unknown_keys"] = unknown
        return kept


class MixedPrecisionConfig(_Frozen):
    """The ``mixed_precision`` section: where each precision lives and which weight uses which."""

    fp16_path: Path | None = None
    bf16_path: Path | None = None
    fp32_path: Path | None = None
    fp8_path: Path | None = None
    int4_path: Path | None = None
    default: Precision | None = None
    weight_mapping: dict[str, Precision] = Field(default_factory=dict)
    serve: Literal["packed", "decoded"] = "packed"

    @field_validator("fp16_path", "bf16_path", "fp32_path", "fp8_path", "int4_path", mode="before")
    @classmethod
    def _resolve_path(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError("expected a folder path")
        path = Path(str(value).strip()).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        try:
            path.resolve()
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot resolve {path}: symlink loop or unreadable link") from e
        return path

    @field_validator("default", mode="before")
    @classmethod
    def _lower_default(cls, value: Any) -> Any:
        return _parse_precision(value)

    @field_validator("serve", mode="before")
    @classmethod
    def _lower_serve(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("weight_mapping", mode="before")
    @classmethod
    def _lower_mapping(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return {k: _parse_precision(v) for k, v in value.items()}
        return value

    def explicit_path(self, precision: Precision) -> Path | None:
        """The folder given for ``precision`` in the file, if any."""
        return getattr(self, precision.path_key)


class InferenceConfig(_KeepsUnknown):
    """The ``inference`` section. ``dtype`` is the serving dtype every weight is decoded to."""

    max_seq_length: int = Field(default=4096, gt=0)
    max_batch_size: int = Field(default=32, gt=0)
    dtype: str = "bfloat16"
    device_map: str = "auto"

    @field_validator("dtype", mode="before")
    @classmethod
    def _canonical_dtype(cls, value: Any) -> Any:
        if isinstance(value, str):
            canonical = _DTYPE_ALIASES.get(value.strip().lower())
            if canonical is None:
                raise ValueError(f"unknown dtype {quote(value)!r}; valid: {sorted(_DTYPE_ALIASES)}")
            return canonical
        return value

    def torch_dtype(self, auto: torch.dtype | None = None) -> torch.dtype:
        """``dtype`` as a torch dtype; ``"auto"`` gives ``auto`` (bfloat16 when not given)."""
        import torch

        if self.dtype == "auto":
            return auto if auto is not None else torch.bfloat16
        return getattr(torch, self.dtype)


class ServerConfig(_KeepsUnknown):
    """The ``server`` section."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_workers: int = Field(default=4, gt=0)


class EnhancedConfig(_Frozen):
    """A whole configuration file, plus the ``--model`` folder it was opened for.

    Build it with :meth:`from_yaml` (or :meth:`from_mapping` for already parsed data);
    both check that every precision used has a folder.
    """

    mixed_precision: MixedPrecisionConfig = Field(default_factory=MixedPrecisionConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    model_path: Path | None = None
    config_file: Path | None = None

    _DICT_FIELDS: ClassVar[frozenset[str]] = frozenset({"weight_mapping", "unknown_keys"})

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, model_path: str | Path | None = None) -> EnhancedConfig:
        """Read and check a configuration file.

        Relative folders in it resolve against the file's folder; ``model_path``
        (the ``--model`` folder) against the working directory.
        """
        path = Path(path).expanduser()
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                raise EnhancedError(f"config file is larger than {MAX_CONFIG_BYTES >> 20} MiB", culprit=str(path))
            text = raw.decode("utf-8")
        except OSError as e:
            raise EnhancedError(f"cannot read config file: {e.strerror or e}", culprit=str(path)) from e
        except UnicodeDecodeError as e:
            raise EnhancedError(f"config file is not UTF-8 text (byte {e.start})", culprit=str(path)) from e
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise EnhancedError(f"invalid YAML: {quote(e.problem or e)}", culprit=where) from e
        except yaml.YAMLError as e:
            raise EnhancedError(f"invalid YAML: {quote(e)}", culprit=str(path)) from e
        except RecursionError:
            raise EnhancedError("invalid YAML: nested too deeply", culprit=str(path)) from None
        if data is None:
            raise EnhancedError("config file is empty", culprit=str(path))
        _check_expanded_size(data, str(path))
        base_dir = resolve_path(path).parent
        return cls.from_mapping(data, base_dir=base_dir, model_path=model_path, config_file=path)

    @classmethod
    def from_mapping(
        cls,
        data: Any,
        *,
        base_dir: str | Path | None = None,
        model_path: str | Path | None = None,
        config_file: str | Path | None = None,
    ) -> EnhancedConfig:
        """Check parsed YAML data; relative folders resolve against ``base_dir``."""
        if not isinstance(data, Mapping):
            raise EnhancedError(
                f"expected a mapping at the top level, got {type(data).__name__}", culprit="<root>"
            )
        for key in data:
            if key not in _SECTIONS:
                raise EnhancedError(f"unknown section; valid: {list(_SECTIONS)}", culprit=quote(key))
        payload = {k: ({} if v is None else v) for k, v in data.items()}
        if model_path is not None:
            payload["model_path"] = resolve_path(model_path)
        if config_file is not None:
            payload["config_file"] = resolve_path(config_file)
        try:
            config = cls.model_validate(payload, context={"base_dir": base_dir})
        except ValidationError as e:
            raise _to_enhanced_error(e) from e
        config.check()
        return config

    # -- derived facts -----------------------------------------------------------------------

    @property
    def default_precision(self) -> Precision | None:
        """Precision of weights no rule maps (see the module docstring); None if unknown."""
        mp = self.mixed_precision
        if mp.default is not None:
            return mp.default
        for precision in _UNQUANTIZED:
            if mp.explicit_path(precision) is not None:
                return precision
        if self.model_path is not None:
            return {"float16": Precision.FP16, "float32": Precision.FP32}.get(
                self.inference.dtype, Precision.BF16
            )
        return None

    def source_path(self, precision: Precision) -> Path | None:
        """The folder ``precision`` is read from, or None when it has none."""
        path = self.mixed_precision.explicit_path(precision)
        if path is None and precision.is_unquantized:
            return self.model_path
        return path

    def used_precisions(self) -> list[Precision]:
        """Precisions named by the mapping or the default, in ``Precision`` order."""
        used = set(self.mixed_precision.weight_mapping.values())
        if self.default_precision is not None:
            used.add(self.default_precision)
        return [p for p in Precision if p in used]

    def source_paths(self) -> dict[Precision, Path]:
        """Folder of every used precision."""
        self.check()
        return {p: self.source_path(p) for p in self.used_precisions()}  # type: ignore[misc]

    def check(self) -> None:
        """Cross-field checks: regexes compile, every used precision has a folder."""
        mp = self.mixed_precision
        for key, precision in mp.weight_mapping.items():
            if not key:
                raise EnhancedError("empty weight name", culprit=mapping_key_path(key))
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise EnhancedError(
                        f"invalid regular expression: {e}", culprit=mapping_key_path(key)
                    ) from e
            if self.source_path(precision) is None:
                raise EnhancedError(
                    f"precision {precision} is used but mixed_precision.{precision.path_key} is not set"
                    + (" and no model folder was given" if precision.is_unquantized else ""),
                    culprit=mapping_key_path(key),
                )
        if mp.default is not None and self.source_path(mp.default) is None:
            raise EnhancedError(
                f"default precision {mp.default} has no folder: set mixed_precision.{mp.default.path_key}",
                culprit="mixed_precision.default",
            )


# -- YAML and error plumbing -------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated within one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quote(key)!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(data: Any, source: str) -> None:
    """Refuse data whose YAML aliases expand to more than ``MAX_EXPANDED_VALUES`` values.

    PyYAML shares one object per anchor, so loading is cheap; anything that walks the data
    (validation, error messages) pays for every expanded value. The walk stops at the limit.
    """
    budget = MAX_EXPANDED_VALUES
    stack = [data]
    while stack:
        value = stack.pop()
        budget -= 1
        if budget < 0:
            raise EnhancedError(
                f"config expands to more than {MAX_EXPANDED_VALUES} values (YAML aliases nested too deep?)",
                culprit=source,
            )
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def _key_path(loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into a YAML key path: ``a.b["key"]`` / ``a.b[0]``."""
    out = ""
    in_dict = False
    for part in loc:
        if part == "[key]":
            out += " (key)"
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif in_dict:
            out += f'["{quote(part)}"]'
            in_dict = False
            continue
        else:
            out += f".{part}" if out else str(part)
        in_dict = part in EnhancedConfig._DICT_FIELDS
    return out or "<root>"


def _to_enhanced_error(e: ValidationError) -> EnhancedError:
    first = e.errors()[0]
    path = _key_path(tuple(first["loc"]))
    msg = quote(first["msg"].removeprefix("Value error, "), 4 * QUOTE_CHARS)
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if first["type"] == "enum":
        msg = f"unknown precision {quote(first.get('input'))!r}; valid: {[p.value for p in Precision]}"
    more = len(e.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return EnhancedError(msg, culprit=path)
