"""What the GPU lane's server will run on: versions, where each package comes from, stand-ins.

Imports every module of SGLang's server path the lane uses, including those the server start
imports lazily; exits non-zero naming the first import that fails (with its traceback).
"""

from __future__ import annotations

import importlib
import sys
import traceback

PACKAGES = ("torch", "triton", "transformers", "tokenizers", "huggingface_hub", "sglang", "fastapi", "uvicorn",
            "pydantic", "zmq", "orjson", "uvloop", "openai", "xgrammar", "numpy", "safetensors")
SERVER_PATH = (
    "sglang.srt.entrypoints.http_server", "sglang.srt.managers.scheduler",
    "sglang.srt.managers.tokenizer_manager", "sglang.srt.managers.detokenizer_manager",
    "sglang.srt.model_executor.model_runner", "sglang.srt.model_executor.cuda_graph_runner",
    "sglang.srt.layers.attention.triton_backend", "sglang.srt.layers.moe.fused_moe_triton.fused_moe",
    "sglang.srt.layers.sampler", "sglang.srt.models.qwen2_moe", "sglang.srt.models.qwen3_moe",
    "sglang.srt.models.mixtral", "sglang.srt.models.olmoe", "sglang.srt.constrained.xgrammar_backend",
    "sglang.srt.enhanced.launch", "sglang.bench_serving",
    # imported lazily on every server start (ModelRunner.initialize -> apply_torchao_config_to_model)
    "torchao.quantization", "torchao.quantization.observer",
)


def main() -> int:
    import torch

    print(f"python {sys.version.split()[0]}; CUDA available: {torch.cuda.is_available()}; "
          f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported, then the lane stops
            print(f"FAIL import {name}: {exc!r}")
            traceback.print_exc()
            return 1
        print(f"  {name:16s} {getattr(module, '__version__', '?'):14s} {getattr(module, '__file__', '')}")
    for name in SERVER_PATH:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL import {name}: {exc!r}")
            traceback.print_exc()
            return 1
    print(f"  server path: {len(SERVER_PATH)} modules import")
    import gpu_lane_kernels

    for name in ("sgl_kernel", "vllm._custom_ops", "flashinfer"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            print(f"  {name}: absent")
            continue
        kind = "lane stand-in" if gpu_lane_kernels.is_stand_in(module) else f"installed ({module.__file__})"
        print(f"  {name}: {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
