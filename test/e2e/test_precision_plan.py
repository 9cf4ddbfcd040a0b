"""Activation-aware precision end to end: serve, drive a skewed workload, plan, serve the plan.

A tiny Qwen2-MoE with 16 experts (top-2) is served in bf16 with expert tracking and the
radix cache off, so repeated prompts are routed again. A fixed set of prompts, repeated,
is the workload; its statistics are exported and planned at a budget between all-int4 and
all-FP8 experts. The plan is served. On the workload, the next-token distributions of
three configs of the same budget family are compared with the bf16 model, in float32
through transformers (weights loaded by our Python API): the plan, uniform int4, and the
plan's budget spent on randomly chosen experts. The plan's KL divergence is the lowest.
"""

from __future__ import annotations

import pytest
import requests
import torch
import yaml

from sglang.srt.enhanced.config import Precision
from sglang.srt.enhanced.mixed_precision.precision_planner import PrecisionPlanner, tokens_from_stats

from .server import start_enhanced

pytestmark = pytest.mark.e2e

WORKLOAD = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Hello world! How are you today?",
]
REPEATS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint
    from sglang.srt.enhanced.tools.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("precision-plan")
    bf16 = build_tiny_model("qwen2_moe", root / "bf16", seed=3, num_experts=16, num_experts_per_tok=2)
    quantize_checkpoint(bf16, root / "int4", "gptq", bits=4, group_size=32, sym=True, desc_act=False)
    quantize_checkpoint(bf16, root / "fp8", "fp8-block", block_size=(32, 32))
    return {"bf16": bf16, "int4": root / "int4", "fp8": root / "fp8", "root": root}


def _next_token_logprobs(model_dir, config_path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from sglang.srt.enhanced_model_loader import load_model_with_enhanced_features

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if config_path is not None:
        load_model_with_enhanced_features(model, str(config_path), enable_expert_tracking=False)
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1) for ids in prompts]


def _kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over positions of KL(reference || other)."""
    total = sum(float((r.exp() * (r - o)).sum()) for r, o in zip(reference, other, strict=True))
    return total / sum(r.shape[0] for r in reference)


def test_plan_from_served_statistics_beats_uniform_and_random(checkpoints, tmp_path) -> None:
    from transformers import AutoTokenizer

    bf16 = checkpoints["bf16"]
    planner = PrecisionPlanner(bf16, {Precision.INT4: checkpoints["int4"], Precision.FP8: checkpoints["fp8"]})
    i = planner.keys.index((0, 0))
    int4, fp8 = (next(o for p, o in zip(planner.precisions[i], planner.options[i], strict=True) if p == want)
                 for want in (Precision.INT4, Precision.FP8))
    budget = planner.minimum_bytes + len(planner.keys) * (fp8.nbytes - int4.nbytes) // 4  # a quarter upgraded

    # Served in bf16; the config names the quantized folders the live planner measures.
    served = tmp_path / "served.yaml"
    served.write_text(yaml.safe_dump({"mixed_precision": {
        "bf16_path": str(bf16), "int4_path": str(checkpoints["int4"]), "fp8_path": str(checkpoints["fp8"]),
        "default": "bf16"}}))
    with start_enhanced(bf16, tmp_path, "--enable-expert-tracking", "--disable-radix-cache", config=served,
                        name="bf16") as srv:
        srv.wait_ready(timeout=600)
        requests.post(srv.base_url + "/expert_stats/reset", timeout=60).raise_for_status()
        for _ in range(REPEATS):
            r = requests.post(srv.base_url + "/generate", json={
                "text": WORKLOAD, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=300)
            r.raise_for_status()
        stats = requests.get(srv.base_url + "/expert_stats/export?format=json", timeout=60).json()
        live = requests.get(srv.base_url + f"/expert_stats/plan?budget={budget}", timeout=300)
        missing = requests.get(srv.base_url + "/expert_stats/plan", timeout=60)
        too_small = requests.get(srv.base_url + f"/expert_stats/plan?budget={planner.minimum_bytes - 1}", timeout=60)
    tokens = tokens_from_stats(stats)
    assert sum(tokens.values()) > 0
    assert live.status_code == 200 and live.headers["content-type"].startswith("application/yaml")
    assert live.text == planner.plan(tokens, budget).to_yaml()  # the live route plans what the tool plans
    assert missing.status_code == 400 and missing.json()["culprit"] == "budget"
    assert too_small.status_code == 400 and str(planner.minimum_bytes) in too_small.json()["error"]
    configs = {}
    for strategy in ("optimal", "random", "uniform"):
        plan = planner.plan(tokens, budget, strategy=strategy, seed=0)
        assert plan.total_bytes <= budget
        path = tmp_path / f"{strategy}.yaml"
        path.write_text(plan.to_yaml())
        configs[strategy] = (path, plan)
    optimal = configs["optimal"][1]
    assert {Precision.INT4, Precision.FP8} <= set(optimal.choice.values())  # mixed inside the layers

    # The plan serves.
    with start_enhanced(bf16, tmp_path, config=configs["optimal"][0], name="planned") as srv:
        srv.wait_ready(timeout=600)
        r = requests.post(srv.base_url + "/generate", json={
            "text": WORKLOAD[0], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, timeout=300)
        r.raise_for_status()
        assert r.json()["meta_info"]["completion_tokens"] == 4

    tokenizer = AutoTokenizer.from_pretrained(bf16)
    prompts = [tokenizer(text)["input_ids"] for text in WORKLOAD]
    reference = _next_token_logprobs(bf16, None, prompts)
    kl = {s: _kl(reference, _next_token_logprobs(bf16, path, prompts)) for s, (path, _) in configs.items()}
    print("KL from bf16:", {s: f"{v:.3e}" for s, v in kl.items()},
          "bytes:", {s: plan.total_bytes for s, (_, plan) in configs.items()})
    assert kl["optimal"] < kl["uniform"]
    assert kl["optimal"] < kl["random"]
