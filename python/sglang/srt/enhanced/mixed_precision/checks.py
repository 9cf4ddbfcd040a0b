"""Checks of a load plan against its checkpoints and the model, run before any weight is loaded.

:func:`check_source_formats` (on the opened folders) and :func:`check_plan` (once the plan
is built) are what the launcher (``--plan`` and a start alike) and every scheduler process
run. They refuse, naming the folder, tensor or weight:

- a folder whose format is not its precision's (``int4_path`` must hold a GPTQ checkpoint,
  ``fp8_path`` an FP8 one, the unquantized paths unquantized tensors);
- stored parts the decoder would refuse: every planned weight is decoded on the ``meta``
  device (shapes and dtypes only, the decoder's own checks), with the small parts a check
  needs read for real: GPTQ ``g_idx`` (its range) and all scales (they must be finite);
- an FP8 weight stored without its scale (it would load unscaled);
- a weight whose decoded shape is not the model's, a model parameter no planned weight
  fills, a float parameter filled from an integer tensor.

The model's parameters come from its own definition: the transformers class of the model
folder's ``config.json``, built on the ``meta`` device (see :func:`model_tensor_shapes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.plan import LoadPlan, PlanEntry
from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource

logger = logging.getLogger(__name__)

__all__ = ["ModelTensors", "check_plan", "check_source_formats", "model_tensor_shapes"]

# The decoder format each precision's folder must have.
_FORMAT = {
    Precision.FP16: "plain",
    Precision.BF16: "plain",
    Precision.FP32: "plain",
    Precision.FP8: "fp8",
    Precision.INT4: "gptq",
}
_LABEL = {"plain": "an unquantized", "fp8": "an FP8", "gptq": "a GPTQ"}
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".weight_scale_inv", ".weight_scale")
_SCALE_SUFFIXES = (".scales", ".weight_scale_inv", ".weight_scale")


@dataclass(frozen=True)
class ModelTensors:
    """Parameter and buffer shapes of the model's definition; ``optional`` ones may be absent (tied)."""

    shapes: Mapping[str, tuple[int, ...]]
    floating: frozenset[str]
    optional: frozenset[str] = frozenset()
    source: str = "the model"


def check_plan(
    plan: LoadPlan,
    sources: Mapping[Precision, CheckpointSource],
    model: ModelTensors | None = None,
) -> None:
    """Decode every planned weight on meta (finite scales); ``model`` (when known) adds the model checks.

    Run :func:`check_source_formats` first, before the plan is built from the sources.
    """
    decoded = {entry.name: decoded_meta(entry, sources[entry.precision], plan.dtype) for entry in plan}
    for source in {id(s): s for s in sources.values()}.values():
        source.release_pages()
    if model is not None:
        check_against_model(decoded, model)


def check_source_formats(config: EnhancedConfig, sources: Mapping[Precision, CheckpointSource]) -> None:
    """Every folder is of its precision's format, by its quantization config and by its tensors."""
    for precision, source in sources.items():
        want = _FORMAT[precision]
        got = source.decoder.format_name
        where = (
            f"mixed_precision.{precision.path_key}"
            if config.mixed_precision.explicit_path(precision) is not None
            else f"the model folder (used for {precision})"
        )
        if got != want:
            raise EnhancedError(
                f"{where} must be {_LABEL[want]} checkpoint, but its quantization config makes it "
                f"{_LABEL.get(got, repr(got))} one",
                culprit=str(source.folder),
            )
        names = source.stored_names
        if want == "plain":
            odd = next((n for n in names if n.endswith(_QUANTIZED_SUFFIXES)), None)
            odd = odd or next((n for n in names if source.info(n).dtype in _FP8_DTYPES), None)
            if odd is not None:
                raise EnhancedError(
                    f"{where} must be an unquantized checkpoint, but it stores quantized tensors "
                    f"({odd}) without a quantization config",
                    culprit=str(source.folder),
                )
        elif want == "gptq" and not any(n.endswith(".qweight") for n in names):
            raise EnhancedError(f"{where} is labelled GPTQ but stores no qweight tensor", culprit=str(source.folder))
        elif want == "fp8" and not any(source.info(n).dtype in _FP8_DTYPES for n in names):
            raise EnhancedError(f"{where} is labelled FP8 but stores no float8 tensor", culprit=str(source.folder))


def decoded_meta(entry: PlanEntry, source: CheckpointSource, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight of ``entry`` on the meta device, after the decoder's checks on real small parts."""
    decoder = source.decoder
    metas = {p: torch.empty(source.shape(p), dtype=source.dtype(p), device="meta") for p in entry.stored_parts}
    scales = [p for p in entry.stored_parts if p.endswith(_SCALE_SUFFIXES)]
    for name in scales:
        _check_finite(entry.name, name, source.read(name))
    if decoder.format_name == "gptq" and any(p.endswith(".qweight") for p in entry.stored_parts):
        return _gptq_meta(entry, source, metas, dtype)
    if decoder.format_name == "fp8" and not scales:
        weight = metas.get(entry.name)
        if weight is not None and weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise EnhancedError(
                "float8 weight stored without weight_scale_inv or weight_scale; it would load unscaled",
                culprit=entry.name,
            )
    try:
        return decoder.decode(entry.name, metas, dtype)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, EnhancedError):
            raise
        raise EnhancedError(f"stored parts cannot be decoded ({str(e)[:200]})", culprit=entry.name) from e


def _gptq_meta(
    entry: PlanEntry, source: CheckpointSource, metas: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    from sglang.srt.enhanced.mixed_precision.formats.gptq import check_gptq_shapes

    prefix = entry.name.removesuffix(".weight")
    settings = source.decoder.settings  # type: ignore[attr-defined]
    g_idx = source.read(f"{prefix}.g_idx") if f"{prefix}.g_idx" in metas else None
    missing = torch.empty(0, device="meta")
    shapes = check_gptq_shapes(
        entry.name,
        metas[f"{prefix}.qweight"],
        metas.get(f"{prefix}.qzeros", missing),
        metas.get(f"{prefix}.scales", missing),
        g_idx,
        settings.bits,
        settings.group_size,
    )
    lead = tuple(metas[f"{prefix}.qweight"].shape[:-2])
    return torch.empty((*lead, shapes.out_features, shapes.in_features), dtype=dtype, device="meta")


def _check_finite(weight: str, part: str, tensor: torch.Tensor) -> None:
    if not tensor.dtype.is_floating_point:
        raise EnhancedError(f"scale tensor {part} must be float, got {tensor.dtype}", culprit=weight)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        raise EnhancedError(
            f"scale tensor {part} has {bad} non-finite values (first at {list(first)}: "
            f"{float(tensor[first])})",
            culprit=weight,
        )


def check_against_model(decoded: Mapping[str, torch.Tensor], model: ModelTensors) -> None:
    """Decoded shapes equal the model's; every model tensor is filled; float ones from float tensors."""
    for name, tensor in decoded.items():
        want = model.shapes.get(name)
        if want is None:
            continue
        if tuple(tensor.shape) != tuple(want):
            raise EnhancedError(
                f"decodes to shape {list(tensor.shape)}, {model.source} expects {list(want)}", culprit=name
            )
        if name in model.floating and not tensor.dtype.is_floating_point:
            raise EnhancedError(
                f"stored as {tensor.dtype}, {model.source} expects a float tensor", culprit=name
            )
    missing = [n for n in model.shapes if n not in decoded and n not in model.optional]
    if missing:
        raise EnhancedError(
            f"{model.source} has {len(missing)} parameters no checkpoint supplies"
            + (f" (first: {missing[:3]})" if len(missing) > 1 else ""),
            culprit=missing[0],
        )
    extra = [n for n in decoded if n not in model.shapes]
    if extra:
        logger.warning(
            "%d checkpoint weights are not parameters of %s and are left to SGLang (first: %s)",
            len(extra), model.source, extra[0],
        )


def model_tensor_shapes(model_folder: Path) -> ModelTensors | None:
    """Parameter shapes of the transformers model class of ``model_folder/config.json``, built on meta.

    transformers 4.x models (Qwen2/Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3) name their
    parameters exactly like the tensors of the unquantized checkpoint, one module per
    expert. Returns None (after a warning) when transformers has no class for the model
    type; SGLang still checks shapes when it loads.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(model_folder), trust_remote_code=False)
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except Exception as e:  # unknown model type, remote code, config transformers rejects
        logger.warning(
            "weight shapes not checked before start: transformers builds no model from %s (%s)",
            model_folder / "config.json", str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
        )
        return None
    state = module.state_dict()
    tied = set(getattr(module, "_tied_weights_keys", None) or ()) if getattr(
        hf_config, "tie_word_embeddings", False
    ) else set()
    return ModelTensors(
        shapes={n: tuple(t.shape) for n, t in state.items()},
        floating=frozenset(n for n, t in state.items() if t.dtype.is_floating_point),
        optional=frozenset(tied),
        source=f"the {type(module).__name__} of {model_folder}",
    )
