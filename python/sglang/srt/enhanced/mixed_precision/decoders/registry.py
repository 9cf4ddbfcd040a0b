"""Pick the weight decoder of a checkpoint folder from its quantization config.

Decoder classes register under the ``quant_method`` names they read with
:func:`register_decoder`; :func:`decoder_for_checkpoint` reads ``config.json``
(``quantization_config.quant_method``) or ``quantize_config.json`` and asks the
registered class to build itself from the folder.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.decoders.base import WeightDecoder

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type] = {}
_BUILTIN_MODULES = ("plain", "gptq", "fp8")
_REQUIRED = ("format_name", "from_checkpoint", "logical_names", "decode", "decoded_nbytes")


def register_decoder(*names: str) -> Callable[[type], type]:
    """Class decorator: register a decoder class under one or more ``quant_method`` names.

    The class must provide ``from_checkpoint(folder, quantization_config)`` and the
    :class:`WeightDecoder` methods.
    """

    def wrap(cls: type) -> type:
        if not isinstance(cls, type):
            raise TypeError(f"register_decoder expects a class, got {cls!r}")
        missing = [attr for attr in _REQUIRED if not hasattr(cls, attr)]
        if missing:
            raise TypeError(f"decoder class {cls.__name__} lacks {missing}")
        for name in names:
            key = name.lower()
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise TypeError(f"decoder name {key!r} already registered by {_REGISTRY[key].__name__}")
            _REGISTRY[key] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"sglang.srt.enhanced.mixed_precision.decoders.{mod}")


def available_formats() -> list[str]:
    """Names ``decoder_for_checkpoint`` understands as ``quant_method``."""
    _load_builtin()
    return sorted(_REGISTRY)


def decoder_class(name: str) -> type:
    """The class registered under ``name``; unknown names list the valid ones."""
    _load_builtin()
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        raise EnhancedError(
            f"unknown checkpoint format {name!r}; valid: {sorted(_REGISTRY)}", culprit="quant_method"
        )
    return cls


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file; failures raise ``EnhancedError`` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EnhancedError(f"cannot read JSON: {e}", culprit=str(path)) from e
    if not isinstance(data, dict):
        raise EnhancedError("expected a JSON object", culprit=str(path))
    return data


def checkpoint_quant_config(folder: Path) -> tuple[str, Mapping[str, Any] | None, Path | None]:
    """``(quant_method, quantization config, file it came from)`` of a checkpoint folder.

    ``config.json``'s ``quantization_config`` wins; else ``quantize_config.json`` (GPTQ
    tools write it); else the folder is unquantized (``"plain"``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EnhancedError("checkpoint folder does not exist", culprit=str(folder))
    config_path = folder / "config.json"
    if config_path.is_file():
        qc = read_json(config_path).get("quantization_config")
        if qc is not None:
            if not isinstance(qc, dict) or not isinstance(qc.get("quant_method"), str):
                raise EnhancedError(
                    "quantization_config must be an object with a string quant_method",
                    culprit=f"{config_path}:quantization_config.quant_method",
                )
            return qc["quant_method"].lower(), qc, config_path
    qpath = folder / "quantize_config.json"
    if qpath.is_file():
        qc = read_json(qpath)
        method = qc.get("quant_method", "gptq")
        if not isinstance(method, str):
            raise EnhancedError("quant_method must be a string", culprit=f"{qpath}:quant_method")
        return method.lower(), qc, qpath
    return "plain", None, None


def decoder_for_checkpoint(folder: Path) -> WeightDecoder:
    """The decoder for the checkpoint in ``folder``, chosen by its quantization config."""
    method, qc, source = checkpoint_quant_config(folder)
    _load_builtin()
    if method not in _REGISTRY:
        raise EnhancedError(
            f"unsupported quant_method {method!r}; valid: {sorted(_REGISTRY)}",
            culprit=f"{source}:quant_method" if source else str(folder),
        )
    decoder = _REGISTRY[method].from_checkpoint(Path(folder), qc)
    logger.debug("checkpoint %s: quant_method %s -> %s", folder, method, type(decoder).__name__)
    return decoder
