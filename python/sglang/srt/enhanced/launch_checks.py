"""Checks of the server settings the launcher runs before anything is loaded (``--plan`` too).

- ``--model`` is an existing folder with a ``config.json`` of the unquantized release;
- ``--host`` is an address of this machine and ``--port`` lies in 1..65535;
- ``--context-length`` (``inference.max_seq_length``) is at most the model's own context
  length (SGLang's ``get_context_length`` of its config) unless
  ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1`` is set, SGLang's switch for longer ones;
- ``--max-running-requests`` (``inference.max_batch_size``) is positive, at most the KV pool's
  token count when that is capped, and its request table (one int32 per request and
  position, which SGLang allocates up front) fits the device's memory.

Each refusal names the YAML key the value came from, else the command-line option.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

from sglang.srt.enhanced.config import EnhancedConfig, quote, resolve_path
from sglang.srt.enhanced.errors import EnhancedError

__all__ = ["check_launch", "check_model_folder", "check_server_address"]

_LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
# ServerArgs field -> (YAML section, key) it may come from.
_YAML_KEYS = {
    "context_length": ("inference", "max_seq_length"),
    "max_running_requests": ("inference", "max_batch_size"),
    "host": ("server", "host"),
    "port": ("server", "port"),
}


def check_launch(args: argparse.Namespace, config: EnhancedConfig, explicit: set[str], device: str) -> None:
    """The address and limit checks of the module docstring, on the final server arguments.

    The model folder is checked first (:func:`check_model_folder`), before the config is read.
    """
    model_folder = resolve_path(Path(args.model_path))
    check_server_address(args.host, args.port, _origin("host", config, explicit), _origin("port", config, explicit))
    hf_config = _read_json(model_folder / "config.json")
    context = _check_context_length(args, config, explicit, hf_config)
    _check_running_requests(args, config, explicit, context, device)


def check_model_folder(model_path: Path) -> Path:
    """``--model`` is a folder with the unquantized release's ``config.json``; returns it resolved."""
    folder = resolve_path(model_path, culprit=str(model_path))
    if not folder.is_dir():
        raise EnhancedError("--model is not a folder", culprit=str(model_path))
    config_json = folder / "config.json"
    if not config_json.is_file():
        raise EnhancedError("the model folder has no config.json", culprit=str(model_path))
    quant = _read_json(config_json).get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise EnhancedError(
            f"--model must be the unquantized release (its config.json declares quantization "
            f"{quote(method)!r}); give quantized folders in the YAML instead",
            culprit=str(config_json),
        )
    return folder


def check_server_address(host: str, port: object, host_key: str = "--host", port_key: str = "--port") -> None:
    """``port`` is an integer in 1..65535 and ``host`` an address this machine can listen on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise EnhancedError(f"port must be an integer in 1..65535, got {quote(port)}", culprit=port_key)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise EnhancedError(f"host {quote(host)!r} is not an address: {e}", culprit=host_key) from None
    family, _, _, _, address = infos[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address[0], 0, *address[2:]))
    except OSError as e:
        raise EnhancedError(
            f"cannot listen on host {quote(host)!r}: {e.strerror or e}", culprit=host_key
        ) from None


def _check_context_length(
    args: argparse.Namespace, config: EnhancedConfig, explicit: set[str], hf_config: dict
) -> int:
    from transformers import PretrainedConfig

    from sglang.srt.hf_transformers_utils import get_context_length

    try:
        model_limit = int(get_context_length(PretrainedConfig(**_text_config(hf_config))))
    except Exception as e:  # a config.json transformers cannot read (odd rope_scaling, types)
        raise EnhancedError(
            f"cannot read the model's context length: {quote(str(e))}",
            culprit=str(Path(args.model_path) / "config.json"),
        ) from None
    wanted = args.context_length
    if wanted is None:
        return model_limit
    key = _origin("context_length", config, explicit)
    if wanted < 1:
        raise EnhancedError(f"context length must be positive, got {wanted}", culprit=key)
    if wanted > model_limit and os.environ.get(_LONGER_CONTEXT_ENV) != "1":
        raise EnhancedError(
            f"context length {quote(wanted, 24)} exceeds the model's own {model_limit} "
            f"(set {_LONGER_CONTEXT_ENV}=1 to allow longer ones)",
            culprit=key,
        )
    return wanted


def _check_running_requests(
    args: argparse.Namespace, config: EnhancedConfig, explicit: set[str], context: int, device: str
) -> None:
    wanted = args.max_running_requests
    if wanted is None:
        return
    key = _origin("max_running_requests", config, explicit)
    if wanted < 1:
        raise EnhancedError(f"running requests must be at least 1, got {wanted}", culprit=key)
    tokens = args.max_total_tokens
    if tokens is not None and wanted > tokens:
        raise EnhancedError(
            f"{quote(wanted, 24)} running requests exceed the KV pool of {tokens} tokens "
            "(each running request holds at least one)",
            culprit=key,
        )
    table = (wanted + 1) * context * 4
    memory = _device_memory(device)
    if memory is not None and table > memory:
        raise EnhancedError(
            f"{quote(wanted, 24)} running requests of {context} positions need a {table / 2**30:.3g} GiB "
            f"request table, more than the {device}'s {memory / 2**30:.3g} GiB",
            culprit=key,
        )


def _device_memory(device: str) -> int | None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _origin(dest: str, config: EnhancedConfig, explicit: set[str]) -> str:
    """Where a server argument's value came from: its option, or the YAML key that set it."""
    option = "--" + dest.replace("_", "-")
    if dest in explicit or config.config_file is None:
        return option
    section, key = _YAML_KEYS[dest]
    return f"{section}.{key}" if key in getattr(config, section).model_fields_set else option


def _text_config(hf_config: dict) -> dict:
    text = hf_config.get("text_config")
    return text if isinstance(text, dict) else hf_config


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EnhancedError(f"cannot read JSON: {quote(str(e))}", culprit=str(path)) from None
    if not isinstance(data, dict):
        raise EnhancedError("expected a JSON object", culprit=str(path))
    return data
