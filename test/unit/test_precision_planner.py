"""Per-expert precision planning on the demo checkpoints (bf16, FP8 block, GPTQ int4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sglang.srt.enhanced.config import EnhancedConfig, Precision
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.kernels.reference import fp8_block_dequant_ref, gptq_dequant_ref
from sglang.srt.enhanced.mixed_precision.plan import build_plan
from sglang.srt.enhanced.mixed_precision.precision_planner import PrecisionPlanner, tokens_from_stats
from sglang.srt.enhanced.mixed_precision.sources import open_sources
from sglang.srt.enhanced.tools import plan_precision

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def planner(demo_checkpoints: dict[str, Path]) -> PrecisionPlanner:
    return PrecisionPlanner(
        demo_checkpoints["bf16"],
        {Precision.INT4: demo_checkpoints["int4"], Precision.FP8: demo_checkpoints["fp8"]},
        keep={"model.layers.*.self_attn.*": Precision.BF16},
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _reference_costs(demo: dict[str, Path], layer: int, expert: int) -> dict[str, tuple[int, float]]:
    """Bytes and mean relative Frobenius error per precision, from the files in float64."""
    bf16, fp8, int4 = (_tensors(demo[p]) for p in ("bf16", "fp8", "int4"))
    block = tuple(json.loads((demo["fp8"] / "config.json").read_text())["quantization_config"]["weight_block_size"])
    out: dict[str, tuple[int, list[float]]] = {"bf16": (0, []), "fp8": (0, []), "int4": (0, [])}
    for proj in PROJECTIONS:
        p = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
        ref = bf16[f"{p}.weight"].double()
        gptq = [int4[f"{p}.{part}"] for part in ("qweight", "qzeros", "scales")] + [int4.get(f"{p}.g_idx")]
        decoded = {
            "bf16": (ref, [bf16[f"{p}.weight"]]),
            "fp8": (fp8_block_dequant_ref(fp8[f"{p}.weight"], fp8[f"{p}.weight_scale_inv"], block, torch.float64),
                    [fp8[f"{p}.weight"], fp8[f"{p}.weight_scale_inv"]]),
            "int4": (gptq_dequant_ref(*gptq, bits=4, group_size=32, zero_offset=1, out_dtype=torch.float64),
                     [t for t in gptq if t is not None]),
        }
        for name, (w, stored) in decoded.items():
            nbytes, errors = out[name]
            errors.append(float((w - ref).norm() / ref.norm()))
            out[name] = (nbytes + sum(t.numel() * t.element_size() for t in stored), errors)
    return {name: (nbytes, sum(errors) / len(errors)) for name, (nbytes, errors) in out.items()}


def test_expert_costs_match_a_float64_reconstruction(planner: PrecisionPlanner, demo_checkpoints) -> None:
    assert len(planner.keys) == 8  # 2 layers x 4 experts
    for key in [(0, 1), (1, 3)]:
        i = planner.keys.index(key)
        got = {str(p): (o.nbytes, o.error) for p, o in zip(planner.precisions[i], planner.options[i], strict=True)}
        want = _reference_costs(demo_checkpoints, *key)
        assert set(got) == set(want)
        for name, (nbytes, error) in want.items():
            assert got[name][0] == nbytes, name
            assert got[name][1] == pytest.approx(error, rel=1e-4, abs=1e-7), name
    assert planner.options[0][0].error == 0.0  # bf16 against itself


def _tokens(hot: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    return {(layer, e): hot.get((layer, e), 0) for layer in range(2) for e in range(4)}


def test_budget_goes_to_the_busy_experts_and_the_config_serves_it(planner, demo_checkpoints, tmp_path) -> None:
    tokens = _tokens({(0, 2): 90, (0, 0): 10, (1, 1): 70, (1, 3): 30})
    i = planner.keys.index((0, 2))
    step = planner.options[i][1].nbytes - planner.options[i][2].nbytes  # fp8 over int4, same for every expert
    plan = planner.plan(tokens, planner.minimum_bytes + 2 * step)
    assert plan.total_bytes <= plan.budget
    upgraded = {k for k, p in plan.choice.items() if p != Precision.INT4}
    assert upgraded == {(0, 2), (1, 1)}
    assert all(plan.choice[k] == Precision.FP8 for k in upgraded)
    assert plan.expected_error < plan.baselines["uniform cheapest"]
    # The written config, read back as a user would, plans exactly these precisions.
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    config = EnhancedConfig.from_yaml(path, model_path=demo_checkpoints["bf16"])
    with open_sources(config) as sources:
        load_plan = build_plan(config, sources)
    for (layer, e), precision in plan.choice.items():
        for proj in PROJECTIONS:
            assert load_plan.entry(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight").precision == precision
    assert load_plan.entry("model.layers.0.self_attn.q_proj.weight").precision == Precision.BF16
    assert sum(e.bytes_on_disk for e in load_plan.entries) == plan.total_bytes


def test_budget_below_the_minimum_names_it(planner) -> None:
    with pytest.raises(EnhancedError) as e:
        planner.plan(_tokens({}), planner.minimum_bytes - 1)
    assert e.value.culprit == "budget" and str(planner.minimum_bytes) in str(e.value)


def test_unknown_experts_in_the_statistics_are_refused(planner) -> None:
    with pytest.raises(EnhancedError) as e:
        planner.plan({**_tokens({}), (0, 9): 3, (7, 0): 1}, planner.minimum_bytes)
    assert e.value.culprit == "layer_0_expert_9" and "layer_7_expert_0" in str(e.value)


def test_keep_rule_on_expert_weights_is_refused(demo_checkpoints) -> None:
    with pytest.raises(EnhancedError) as e:
        PrecisionPlanner(demo_checkpoints["bf16"], {Precision.INT4: demo_checkpoints["int4"]},
                         keep={"model.layers.*.mlp.*": Precision.INT4})
    assert e.value.culprit == "model.layers.*.mlp.*"


def test_statistics_in_either_export_form() -> None:
    by_expert = {"expert_stats": {"layer_0_expert_1": {"layer_id": 0, "expert_id": 1, "total_tokens_processed": 5}}}
    by_layer = {"layer_stats": {"0": {"experts": {"1": {"total_tokens_processed": 5}}}}}
    assert tokens_from_stats(by_expert) == tokens_from_stats(by_layer) == {(0, 1): 5}
    with pytest.raises(EnhancedError):
        tokens_from_stats({"summary": {}})


def test_command_line(demo_checkpoints, tmp_path, capsys) -> None:
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"expert_stats": {
        f"layer_{layer}_expert_{e}": {"layer_id": layer, "expert_id": e, "total_tokens_processed": 10 * e}
        for layer in range(2) for e in range(4)}}))
    common = ["--stats", str(stats), "--model", str(demo_checkpoints["bf16"]), "--int4", str(demo_checkpoints["int4"]),
              "--fp8", str(demo_checkpoints["fp8"])]
    assert plan_precision.main([*common, "--budget", "1KiB", "-o", str(tmp_path / "x.yaml")]) == 2
    assert "below the smallest size" in capsys.readouterr().err
    out = tmp_path / "plan.yaml"
    assert plan_precision.main([*common, "--budget", "1MiB", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "uniform cheapest" in printed and out.is_file()
    assert "int4_path" in out.read_text()
