"""Compile every Triton kernel the product launches for a Hopper GPU (sm_90) with the installed Triton.

Run as a script, in a process where TRITON_INTERPRET is NOT set (the kernels must be real
``JITFunction`` objects): ``python test/kernels/aot_compile.py``. It prints one line per compiled
kernel variant and exits 1 when a variant fails to compile or a kernel is never compiled; a failure
names the kernel, the variant and Triton's error.

The real launchers are called on CPU tensors. Each kernel launch goes through Triton's own
``JITFunction.run`` with ``warmup=True``: the installed Triton binds the arguments, specialises
them (dtypes, integer and pointer alignment, ``do_not_specialize``) and compiles, but launches
nothing. Without a GPU, a stand-in driver tells Triton the device is an sm_90 one; the PTX goes
through the ptxas bundled with Triton. With a GPU, the local one is the target.

The GPU's choices are made explicitly where a launcher would ask the device (a CPU tensor gets the
interpreter's small tiles): fused MoE configs come from the H200 tuning file
(``configs/fused_moe_NVIDIA_H200.json``) or the heuristic for untuned shapes; linear configs from
``pick_linear_config`` for a CUDA device; GPTQ dequant tiles from ``pick_config`` with the H200's
132 SMs. The constexprs that depend on the interpreter take their GPU values by themselves, since
the kernels are not interpreted here: ``F32_DOT=False`` and word-plane ``BLOCK_K`` widened to feed
tensor cores at least 16 rows deep.

Left out (the same code paths at other tile sizes, dtypes or integer values), to keep the run near
40 s on two cores: most tuned batch sizes of each tuned shape (each weight format gets one gemv and
one gemm config), fp16/fp32 activations and bf16 GPTQ scales in the fused MoE (fp16 is compiled in
one linear case), act-order in the MoE for other bit widths than 4, int64 ``g_idx``, the dequant
kernel's value-gathering variant (reached only through an explicit ``config``), and the tracker's
fold with a ring but no co-activation counts (or the reverse).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("aot_compile.py must run without TRITON_INTERPRET: the interpreter never compiles")
# A fresh cache: every variant is compiled here, none is taken from an earlier run.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H200_SMS = 132
HOPPER = (90, 32)  # compute capability, warp size


def cuda_backend_missing() -> str | None:
    """Why this Triton cannot compile for an NVIDIA GPU here, or None when it can."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return "the installed Triton has no CUDA backend"
    if torch.cuda.is_available():
        return None
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / "ptxas"
    if not (bundled.exists() or os.environ.get("TRITON_PTXAS_PATH")):
        return "the installed Triton has no bundled ptxas"
    return None


class HopperDriver:
    """Stands in for the CUDA driver on a machine without a GPU: Triton's ``run`` with ``warmup=True``
    asks it only for the current device, stream and compile target."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", *HOPPER)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


class OnGPU(torch.Tensor):
    """A CPU tensor that the launchers' ``x.is_cuda`` guards take for a CUDA one; Triton reads only its
    dtype, address and strides when it compiles."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def gpu(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(OnGPU)


class Compiler:
    """Routes every kernel launch to a compile of its variant, keeping what compiled and what failed."""

    def __init__(self) -> None:
        self.variant = ""
        self.compiled: list[tuple[str, str, float, int]] = []
        self.seen: dict[int, object] = {}
        self.failed: list[tuple[str, str, str]] = []
        self.launched: set[str] = set()

    def install(self) -> None:
        run = JITFunction.run
        compiler = self

        def compile_only(fn, *args, grid, warmup, **kwargs):
            name = fn.__name__
            compiler.launched.add(name)
            start = time.perf_counter()
            try:
                kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
                cubin = kernel.asm.get("cubin") if kernel is not None else None
                if not cubin:
                    raise RuntimeError(f"no cubin came out (asm: {sorted(kernel.asm) if kernel else None})")
            except Exception as exc:  # noqa: BLE001 - every compile error is reported, by kernel and variant
                compiler.failed.append((name, compiler.variant, _short_error(exc)))
                return None
            if id(kernel) not in compiler.seen:  # else a variant compiled before, taken from Triton's cache
                compiler.seen[id(kernel)] = kernel
                compiler.compiled.append((name, compiler.variant, time.perf_counter() - start, len(cubin)))
            return None

        JITFunction.run = compile_only
        # Launch through run() even where a Triton version has a faster path for kernels it compiled before.
        JITFunction.__getitem__ = lambda fn, grid: lambda *args, **kwargs: fn.run(*args, grid=grid, warmup=False,
                                                                                    **kwargs)  # fmt: skip
        if not torch.cuda.is_available():
            from triton.runtime.driver import driver

            driver.set_active(HopperDriver())


def _short_error(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = text.splitlines()
    return "\n    ".join(lines[:40] + (["..."] if len(lines) > 40 else []))


# ---------------------------------------------------------------- weights (values do not matter)

def gptq(e: int | None, k: int, n: int, bits: int, group_size: int, *, act_order: bool = False,
         per_part: bool = False, zero_offset: int = 1, sorted_rows: bool = False) -> object:  # fmt: skip
    """GPTQ weights in the checkpoint layout (``packed_weights``); ``e`` None: one linear weight;
    ``sorted_rows``: an act-order weight as ``act_order.sort_act_order`` leaves it (``perm``, no ``g_idx``)."""
    from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import GPTQExperts

    lead = () if e is None else (e,)
    groups = 1 if group_size == -1 else -(-k // group_size)
    g_idx = None
    if act_order:
        g_idx = torch.zeros(*lead, *((2,) if per_part else ()), k, dtype=torch.int32)
    return GPTQExperts(
        qweight=torch.empty(*lead, k * bits // 32, n, dtype=torch.int32),
        qzeros=torch.empty(*lead, groups, n * bits // 32, dtype=torch.int32),
        scales=torch.empty(*lead, groups, n, dtype=torch.float16),
        g_idx=None if sorted_rows else g_idx, bits=bits, group_size=group_size, zero_offset=zero_offset,
        perm=g_idx if sorted_rows else None,
    )  # fmt: skip


def fp8(e: int | None, k: int, n: int, block: tuple[int, int] | None) -> object:
    from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts

    lead = () if e is None else (e,)
    scale_shape = (*lead, n) if block is None else (*lead, -(-n // block[0]), -(-k // block[1]))
    return FP8Experts(torch.empty(*lead, n, k, dtype=torch.float8_e4m3fn),
                      torch.empty(*scale_shape, dtype=torch.float32), block)  # fmt: skip


# ---------------------------------------------------------------- variants: the real launchers

BF16 = torch.bfloat16


def _moe_config(fmt: str, shape: str, tokens: int):
    """The config a CUDA launch picks on an H200: tuned for ``shape``, else the heuristic."""
    from sglang.srt.enhanced.mixed_precision.kernels import moe_configs as mc

    e, h, inter, k = (int(p[1:]) for p in shape.split(":"))
    tuned = mc._load(mc.CONFIG_DIR / "fused_moe_NVIDIA_H200.json")
    found = mc.pick_tuned(tuned, fmt, e, h, inter, k, tokens)
    return found if found is not None else mc.default_moe_config(fmt, e, h, inter, k, tokens)


def moe_case(fmt: str, shape: str, tokens: int, *, local: int | None = None, act_order: bool = False,
             zero_offset: int = 1, group_size: int = 128, activation: str = "silu",
             config: object = None, sorted_rows: bool = False) -> Callable[[], None]:  # fmt: skip
    """``fused_moe_sets`` for one layer shape ``E..:H..:I..:k..``; ``local`` experts of the ``E`` held
    behind an expert map (HAS_MAP), else 16 stacked experts without one; ``config`` (a ``MoEConfig``)
    for a kernel shape the tuned file does not pick."""
    from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import fused_moe_sets

    def run() -> None:
        e_all, h, inter, top_k = (int(p[1:]) for p in shape.split(":"))
        held = local if local is not None else 16
        if fmt.startswith("int"):
            bits = int(fmt[3:])
            w13 = gptq(held, h, 2 * inter, bits, group_size, act_order=act_order, per_part=act_order,
                       zero_offset=zero_offset, sorted_rows=sorted_rows)  # fmt: skip
            w2 = gptq(held, inter, h, bits, group_size, act_order=act_order, zero_offset=zero_offset,
                      sorted_rows=sorted_rows)  # fmt: skip
        else:
            block = (128, 128) if fmt == "fp8_block" else None
            w13, w2 = fp8(held, h, 2 * inter, block), fp8(held, inter, h, block)
        expert_map = None
        if local is not None:
            expert_map = torch.full((e_all,), -1, dtype=torch.int32)
            expert_map[:local] = torch.arange(local, dtype=torch.int32)
        x = gpu(torch.zeros(tokens, h, dtype=BF16))
        ids = (torch.arange(tokens * top_k, dtype=torch.int32) % held).reshape(tokens, top_k)
        weights = torch.zeros(tokens, top_k, dtype=torch.float32)
        fused_moe_sets(x, [(w13, expert_map)], [(w2, expert_map)], weights, ids, activation=activation,
                       config=config or _moe_config(fmt, shape, tokens))  # fmt: skip

    return run


def align_case(tokens: int, top_k: int, num_experts: int, block_m: int) -> Callable[[], None]:
    """The one-program alignment that CUDA batches of up to ``ONE_PROGRAM_PAIRS`` pairs take."""
    from sglang.srt.enhanced.mixed_precision.kernels.moe_align import _align_one_program

    def run() -> None:
        ids = (torch.arange(tokens * top_k, dtype=torch.int32) % num_experts).reshape(tokens, top_k)
        _align_one_program(gpu(ids), block_m, num_experts)

    return run


def linear_case(w: object, m: int, *, bias: bool = False, dtype: torch.dtype = BF16) -> Callable[[], None]:
    """``gptq_linear`` / ``fp8_linear`` with the config a CUDA launch of ``m`` rows picks."""
    from sglang.srt.enhanced.mixed_precision.kernels import packed_linear as pl
    from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import GPTQExperts

    def run() -> None:
        k, n = w.in_features, w.out_features
        if isinstance(w, GPTQExperts):
            fmt, fn = f"int{w.bits}", pl.gptq_linear
        else:
            fmt, fn = ("fp8_block" if w.block_size is not None else "fp8_channel"), pl.fp8_linear
        cfg = pl.pick_linear_config(fmt, m, n, k, torch.device("cuda"))
        fn(gpu(torch.zeros(m, k, dtype=dtype)), w, torch.zeros(n, dtype=dtype) if bias else None, config=cfg)

    return run


def gptq_dequant_case(e: int | None, k: int, n: int, bits: int, group_size: int, *, act_order: bool = False,
                      zero_offset: int = 1) -> Callable[[], None]:  # fmt: skip
    """``gptq_dequant`` / ``gptq_dequant_batched`` (as ``dequant.py`` calls them) with the H200's tile choice."""
    from sglang.srt.enhanced.mixed_precision.kernels import gptq_dequant as gd

    def run() -> None:
        w = gptq(e, k, n, bits, group_size, act_order=act_order, zero_offset=zero_offset)
        gd._SM_COUNT.setdefault(0, H200_SMS)
        cfg = gd.pick_config(bits, e or 1, n, k, torch.device("cuda", 0), act_order)
        fn = gd.gptq_dequant_batched if e is not None else gd.gptq_dequant
        fn(gpu(w.qweight), w.qzeros, w.scales, w.g_idx, bits=bits, group_size=group_size, zero_offset=zero_offset,
           out_dtype=BF16, use_triton=True, config=cfg)  # fmt: skip

    return run


def fp8_dequant_case(m: int, n: int, kind: str, tiles: tuple[int, int, int]) -> Callable[[], None]:
    """``fp8_block_dequant`` (``kind`` "block") or ``fp8_scaled_dequant`` ("channel" / "tensor")."""
    from sglang.srt.enhanced.mixed_precision.kernels import fp8_dequant as fd

    def run() -> None:
        w = gpu(torch.empty(m, n, dtype=torch.float8_e4m3fn))
        if kind == "block":
            fd.fp8_block_dequant(w, torch.empty(-(-m // 128), -(-n // 128)), (128, 128), BF16, use_triton=True,
                                 config=tiles)  # fmt: skip
        else:
            scale = torch.empty(m if kind == "channel" else 1, dtype=torch.float32)
            fd.fp8_scaled_dequant(w, scale, BF16, use_triton=True, config=tiles)

    return run


def fold_case(num_experts: int, top_k: int, *, ring: bool, coactivation: bool) -> Callable[[], None]:
    """The tracker's ``warm_up``: every fold variant a server meets (one block or split; with and
    without per-request counts)."""
    from sglang.srt.enhanced.moe_tracker import fold_kernel

    def run() -> None:
        fold_kernel.warm_up(num_experts, top_k, torch.device("cpu"), ring=ring, coactivation=coactivation)

    return run


def variants() -> list[tuple[str, Callable[[], None]]]:
    """(name, launcher call) for the representative variants; see the module docstring for what is left out."""
    from sglang.srt.enhanced.mixed_precision.kernels.fp8_dequant import TILE_LADDER as FP8_TILES
    from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import GemmConfig, MoEConfig

    qwen3, dsv3, mixtral = "E128:H2048:I768:k8", "E256:H7168:I256:k8", "E8:H4096:I14336:k2"
    untuned = "E60:H2048:I1408:k4"
    grouped = MoEConfig("grouped", GemmConfig(128, 128, 4, 2, 1, "join"), GemmConfig(256, 64, 4, 2, 1, "join"), 4)
    split_gemm = MoEConfig("gemm", GemmConfig(64, 128, 4, 3, 16, "join"), GemmConfig(64, 128, 4, 3, 6, "join"), 16)
    return [
        # fused MoE: gemv (gated split -> _split_act_kernel) and gemm, each weight format, HAS_MAP on/off
        ("moe int4 gemv t1 split", moe_case("int4", qwen3, 1)),
        ("moe int4 gemm t64 map v2", moe_case("int4", qwen3, 64, local=2, zero_offset=0)),
        ("moe int4 act-order gemm t256 map", moe_case("int4", dsv3, 256, local=2, act_order=True)),
        ("moe int4 act-order gemv t1 gelu", moe_case("int4", qwen3, 1, act_order=True, activation="gelu")),
        ("moe int4 sorted act-order gemv t1", moe_case("int4", qwen3, 1, act_order=True, sorted_rows=True)),
        ("moe int4 sorted act-order gemm t256 map", moe_case("int4", dsv3, 256, local=2, act_order=True,
                                                             sorted_rows=True)),
        ("moe int4 sorted act-order grouped t16", moe_case("int4", qwen3, 16, act_order=True, sorted_rows=True,
                                                           config=grouped)),
        ("moe int8 gemv t4 map", moe_case("int8", dsv3, 4, local=2)),
        ("moe int8 gemm t16", moe_case("int8", qwen3, 16, group_size=-1)),
        ("moe int2 gemm t1024 map", moe_case("int2", qwen3, 1024, local=2, group_size=64)),
        ("moe int3 gemv t1 map", moe_case("int3", qwen3, 1, local=2)),
        ("moe int3 gemm t64", moe_case("int3", qwen3, 64, group_size=32)),
        ("moe fp8_block gemv t1 split map", moe_case("fp8_block", qwen3, 1, local=2)),
        ("moe fp8_block gemm t4 mixtral map", moe_case("fp8_block", mixtral, 4, local=2)),
        ("moe fp8_channel gemv t1", moe_case("fp8_channel", dsv3, 1)),
        ("moe fp8_channel gemm t64 map", moe_case("fp8_channel", qwen3, 64, local=2)),
        ("moe int4 untuned gemm t512 (block_m 64)", moe_case("int4", untuned, 512)),
        ("moe int4 grouped t16 map", moe_case("int4", qwen3, 16, local=2, config=grouped)),
        ("moe fp8_block grouped t16", moe_case("fp8_block", qwen3, 16, config=grouped)),
        ("moe int4 gemm split t64", moe_case("int4", qwen3, 64, config=split_gemm)),
        ("moe align one program", align_case(16, 8, 128, 16)),
        # packed linear: decode (no dot, split K), mid (dot, split K), prefill (dot)
        ("linear int4 m1", linear_case(gptq(None, 2048, 4096, 4, 128), 1)),
        ("linear int4 m16", linear_case(gptq(None, 2048, 4096, 4, 128, zero_offset=0), 16)),
        ("linear int4 m512 bias", linear_case(gptq(None, 2048, 4096, 4, 128), 512, bias=True)),
        ("linear int3 m1", linear_case(gptq(None, 2048, 4096, 3, 128), 1)),
        ("linear int3 m128 fp16", linear_case(gptq(None, 2048, 4096, 3, 128), 128, dtype=torch.float16)),
        ("linear int8 act-order m16", linear_case(gptq(None, 2048, 4096, 8, 128, act_order=True), 16)),
        ("linear int4 sorted act-order m1", linear_case(gptq(None, 2048, 4096, 4, 128, act_order=True,
                                                             sorted_rows=True), 1)),
        ("linear int2 m128", linear_case(gptq(None, 2048, 4096, 2, 64), 128)),
        ("linear fp8_block m1", linear_case(fp8(None, 2048, 4096, (128, 128)), 1)),
        ("linear fp8_block m512", linear_case(fp8(None, 2048, 4096, (128, 128)), 512)),
        ("linear fp8_channel m16 bias", linear_case(fp8(None, 2048, 4096, None), 16, bias=True)),
        # GPTQ dequant: split-word kernel (each bit width), k-major (3-bit act-order), row-split (act-order)
        ("dequant int4 g128 experts", gptq_dequant_case(16, 2048, 1536, 4, 128)),
        ("dequant int8 g32", gptq_dequant_case(None, 4096, 4096, 8, 32)),
        ("dequant int2 g-1 v2", gptq_dequant_case(None, 4096, 4096, 2, -1, zero_offset=0)),
        ("dequant int3 g128", gptq_dequant_case(None, 4096, 4096, 3, 128)),
        ("dequant int3 act-order", gptq_dequant_case(None, 4096, 4096, 3, 128, act_order=True)),
        ("dequant int4 act-order experts", gptq_dequant_case(8, 2048, 1536, 4, 128, act_order=True)),
        ("dequant int4 many experts (streamed stores)", gptq_dequant_case(128, 2048, 1536, 4, 128)),
        # FP8 dequant
        ("dequant fp8 block", fp8_dequant_case(4096, 4096, "block", FP8_TILES[0])),
        ("dequant fp8 channel", fp8_dequant_case(4096, 4096, "channel", FP8_TILES[1])),
        ("dequant fp8 tensor", fp8_dequant_case(1024, 1024, "tensor", FP8_TILES[-1])),
        # tracker fold (one block per layer and split, with and without per-request counts)
        ("fold E128 k8 ring coact", fold_case(128, 8, ring=True, coactivation=True)),
        ("fold E60 k4", fold_case(60, 4, ring=False, coactivation=False)),
    ]


def launched_kernels() -> set[str]:
    """Every ``@triton.jit`` kernel (name ending in ``_kernel``) of the kernel modules and the tracker fold."""
    import importlib
    import pkgutil

    from sglang.srt.enhanced.mixed_precision import kernels

    modules = [importlib.import_module(f"{kernels.__name__}.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
    modules.append(importlib.import_module("sglang.srt.enhanced.moe_tracker.fold_kernel"))
    return {name for mod in modules for name, obj in vars(mod).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}  # fmt: skip


def main(selected: list[str]) -> int:
    reason = cuda_backend_missing()
    if reason:
        print(f"SKIP: {reason}")
        return 0
    compiler = Compiler()
    compiler.install()
    target = "local GPU" if torch.cuda.is_available() else f"sm_{HOPPER[0]}"
    print(f"triton {triton.__version__}, torch {torch.__version__}, target {target}")
    start = time.perf_counter()
    for name, launch in variants():
        if selected and not any(s in name for s in selected):
            continue
        compiler.variant = name
        try:
            launch()
        except Exception as exc:  # noqa: BLE001 - a launcher that breaks before its launch is a failure too
            compiler.failed.append(("<launcher>", name, _short_error(exc)))
    for kernel, variant, seconds, size in compiler.compiled:
        print(f"ok {kernel} [{variant}] {seconds:.1f}s, cubin {size} bytes")
    missing = set() if selected else launched_kernels() - compiler.launched
    for kernel in sorted(missing):
        print(f"FAILED {kernel}: no variant launches it")
    for kernel, variant, error in compiler.failed:
        print(f"FAILED {kernel} [{variant}]:\n    {error}")
    print(f"{len(compiler.compiled)} compiled, {len(compiler.failed)} failed, {len(missing)} never launched, "
          f"{time.perf_counter() - start:.0f}s")  # fmt: skip
    return 1 if compiler.failed or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
