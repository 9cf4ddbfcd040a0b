"""Packed serving vs decoded serving of the same config, through the real server.

For each MoE architecture (the demo is the Qwen2-MoE case; tiny Qwen3-MoE, Mixtral and
OLMoE checkpoints with GPTQ-int4 experts and FP8 per-channel attention for the others) one
server runs ``mixed_precision.serve: packed`` and one ``decoded``, started together.

Bound on prompt logprobs: ``|packed - decoded| <= 0.02``. Both modes multiply by the same
bf16 weights (the packed CPU path decodes the stored tensors with the same reference
function, to the same dtype, as the decoded load; the unit tests check that bit for bit)
and the packed expert loop repeats SGLang's torch-native MoE step by step; what may differ
is the blocking of a matmul over a different number of rows, which changes a bf16 output
by at most one rounding (2**-8 relative). Through these 2-layer models with logits below
4 in magnitude that moves a log-softmax by well under 0.02 (seen: identical values).

The demo's packed config also maps ``q_proj`` of layer 0 to int4 (its ``qkv_proj`` then
fuses int4 with bf16: served decoded, with one warning) and gives layer 1's experts their
own precisions (exact names and a regex): expert 0 int4 with its down projection fp8,
expert 1 bf16 gate/up with int4 down, experts 2 and 3 fp8. That FusedMoE is served
packed-mixed (one packed set per format and slot) and must give the decoded layer's numbers
within the same bound: each routed expert is decoded from its own set with the same
reference function as the decoded load, so only matmul blocking can differ.
"""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest
import requests
import yaml
from safetensors import safe_open

from .server import REPO, prompt_logprobs, start_enhanced
from .test_serve_demo import hand_precision

pytestmark = pytest.mark.e2e

API_KEY = "sk-test-packed"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LOGPROB_BOUND = 0.02
PROMPT_IDS = list(range(3, 60, 2))
MIXED_RULES = {
    "model.layers.0.self_attn.q_proj.weight": "int4",
    "model.layers.1.mlp.experts.0.down_proj.weight": "fp8",
    "model.layers.1.mlp.experts.1.gate_proj.weight": "bf16",
    "model.layers.1.mlp.experts.1.up_proj.weight": "bf16",
    r"re:model\.layers\.1\.mlp\.experts\.[23]\.(gate|up|down)_proj\.weight": "fp8",
}
LAYER1_FORMATS = {"fp8-block32x32": 2, "gate/up gptq-4bit-g32, down fp8-block32x32": 1,
                  "gate/up unquantized, down gptq-4bit-g32": 1}


def write_config(path: Path, mapping: dict, serve: str) -> Path:
    data = {"mixed_precision": {**mapping, "serve": serve}, "inference": {"dtype": "bfloat16"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_pair(model: Path, mapping: dict, tmp: Path, *extra: str):  # noqa: ANN201
    servers = [
        start_enhanced(model, tmp, *extra, config=write_config(tmp / f"{serve}.yaml", mapping, serve), name=serve)
        for serve in ("packed", "decoded")
    ]
    try:
        for srv in servers:
            srv.wait_ready(600)
    except BaseException:
        for srv in servers:
            srv.stop()
        raise
    return servers


def get(srv, route: str) -> dict:  # noqa: ANN001
    r = requests.get(srv.base_url + route, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def assert_logprobs_agree(packed, decoded) -> None:  # noqa: ANN001
    a = prompt_logprobs(packed.base_url, PROMPT_IDS, AUTH)
    b = prompt_logprobs(decoded.base_url, PROMPT_IDS, AUTH)
    assert len(a) == len(b) == len(PROMPT_IDS) - 1
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    assert worst <= LOGPROB_BOUND, worst


# -- the demo -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pair(demo_checkpoints, tmp_path_factory):
    shipped = yaml.safe_load((REPO / "mixed_precision_config.yaml").read_text())["mixed_precision"]
    mapping = {
        **{f"{p}_path": str(path) for p, path in demo_checkpoints.items()},
        "weight_mapping": {**shipped["weight_mapping"], **MIXED_RULES},
    }
    tmp = tmp_path_factory.mktemp("packed-demo")
    servers = start_pair(demo_checkpoints["bf16"], mapping, tmp, "--enable-expert-tracking", "--api-key", API_KEY,
                         "--disable-radix-cache")
    yield servers
    for srv in servers:
        srv.stop()


def stored_bytes(folder: Path, names: list[str]) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(t.numel() * t.element_size() for t in (f.get_tensor(n) for n in names))


def bf16_bytes(folder: Path, names: list[str]) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(2 * math.prod(f.get_slice(n).get_shape()) for n in names)


def precision_of(name: str) -> str:
    """The demo config's rules plus the mixed rules, applied by hand."""
    if name.startswith(("model.layers.1.mlp.experts.2.", "model.layers.1.mlp.experts.3.")):
        return "fp8"
    return MIXED_RULES.get(name) or hand_precision(name)


def expected_in_memory(demo: dict[str, Path], packed: bool) -> dict[str, int]:
    """Bytes per precision: packed modules keep their stored tensors, every other weight takes bf16.

    Packed (in packed mode): both layers' experts (int4: qweight, qzeros, scales; g_idx is the
    identity order here, so it is dropped; fp8: weight + block scales; layer 1's bf16 expert
    projections in bf16) and both shared experts (fp8). Decoded: layer 0's qkv_proj (int4 +
    bf16), all bf16 weights.
    """
    with safe_open(str(demo["bf16"] / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    out = {"bf16": 0, "fp8": 0, "int4": 0}
    for name in names:
        precision = precision_of(name)
        prefix = name.removesuffix(".weight")
        if packed and precision == "int4" and ".mlp.experts." in name:
            out["int4"] += stored_bytes(demo["int4"], [f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales")])
        elif packed and precision == "fp8" and (".shared_expert." in name or ".mlp.experts." in name):
            out["fp8"] += stored_bytes(demo["fp8"], [name, f"{prefix}.weight_scale_inv"])
        else:
            out[precision] += bf16_bytes(demo["bf16"], [name])
    return out


def test_demo_memory_report_counts_the_packed_tensors(demo_pair, demo_checkpoints) -> None:
    packed, decoded = demo_pair
    for srv, is_packed in ((packed, True), (decoded, False)):
        report = get(srv, "/mixed_precision")
        assert report["serve"] == ("packed" if is_packed else "decoded")
        held = {p: v["bytes_in_memory"] for p, v in report["precisions"].items()}
        assert held == expected_in_memory(demo_checkpoints, is_packed)
    modules = get(packed, "/mixed_precision")["modules"]
    assert modules["model.layers.0.mlp.experts"] == {"precision": "int4", "method": "gptq-4bit-g32"}
    assert modules["model.layers.1.mlp.shared_expert.gate_up_proj"] == {"precision": "fp8", "method": "fp8-block32x32"}
    assert modules["model.layers.0.self_attn.qkv_proj"] == {"precision": "bf16+int4", "method": "decoded"}
    assert modules["model.layers.1.mlp.experts"] == {"precision": "bf16+fp8+int4", "method": "packed-mixed",
                                                     "formats": LAYER1_FORMATS}
    decoded_modules = get(decoded, "/mixed_precision")["modules"]
    assert decoded_modules["model.layers.1.mlp.experts"] == {"precision": "bf16+fp8+int4", "method": "decoded"}
    assert modules["model.layers.1.self_attn.qkv_proj"] == {"precision": "bf16", "method": "unquantized"}
    # The route sits behind --api-key like SGLang's own.
    assert requests.get(packed.base_url + "/mixed_precision", timeout=60).status_code == 401


def test_demo_mixed_modules_are_decoded_with_one_warning_each(demo_pair) -> None:
    """The mixed qkv_proj is decoded (one warning); the mixed FusedMoE is served packed (no warning)."""
    packed, _ = demo_pair
    lines = packed.log().splitlines()
    qkv = [ln for ln in lines if "model.layers.0.self_attn.qkv_proj is served decoded" in ln]
    assert len(qkv) == 1 and "bf16, int4" in qkv[0]
    assert not [ln for ln in lines if "mlp.experts is served decoded" in ln]
    line = next(ln for ln in lines if "Mixed-precision load: serve packed," in ln)
    assert "int4: 16 tensors" in line and "in memory" in line


def test_demo_logprobs_and_greedy_completions_agree(demo_pair) -> None:
    packed, decoded = demo_pair
    assert_logprobs_agree(packed, decoded)
    messages = [{"role": "user", "content": "Hello world! How are you today?"}]
    replies = []
    for srv in demo_pair:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        chat = client.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
        text = client.completions.create(model="default", prompt="The quick brown fox jumps over", max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})
        replies.append((chat.choices[0].message.content, text.choices[0].text))
    assert replies[0] == replies[1]


def test_demo_expert_counts_are_the_same_packed(demo_pair) -> None:
    counts = []
    for srv in demo_pair:
        assert requests.post(srv.base_url + "/expert_stats/reset", headers=AUTH, timeout=120).status_code == 200
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        for i in range(4):
            client.completions.create(model="default", prompt=f"Numbers: {i} {i * 3} {i * 7} and the sea",
                                      max_tokens=1, temperature=0)
        stats = get(srv, "/expert_stats")
        counts.append({layer: {e: s["prefill_tokens"] for e, s in layer_stats["experts"].items()}
                       for layer, layer_stats in stats["layer_stats"].items()})
    assert counts[0] == counts[1]
    assert sum(sum(layer.values()) for layer in counts[0].values()) > 0


# -- the other architectures ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_architecture_served_packed_agrees_with_decoded(arch, tiny_model_factory, tmp_path_factory) -> None:
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    bf16 = tiny_model_factory(arch)
    tmp = tmp_path_factory.mktemp(f"packed-{arch}")
    int4 = quantize_checkpoint(bf16, tmp / "int4", "gptq", bits=4, group_size=32, sym=False, desc_act=True)
    fp8 = quantize_checkpoint(bf16, tmp / "fp8", "fp8-channel")
    mapping = {
        "bf16_path": str(bf16), "int4_path": str(int4), "fp8_path": str(fp8),
        "weight_mapping": {"*.experts.*.weight": "int4", "*.self_attn.*_proj.weight": "fp8"},
    }
    packed, decoded = start_pair(bf16, mapping, tmp, "--api-key", API_KEY)
    try:
        assert_logprobs_agree(packed, decoded)
        modules = get(packed, "/mixed_precision")["modules"]
        experts = [m for name, m in modules.items() if name.endswith(".experts")]
        qkv = [m for name, m in modules.items() if name.endswith(".qkv_proj")]
        assert len(experts) == len(qkv) == 2
        assert all(m == {"precision": "int4", "method": "gptq-4bit-g32-act"} for m in experts)
        assert all(m == {"precision": "fp8", "method": "fp8-channel"} for m in qkv)
        held = {p: v["bytes_in_memory"] for p, v in get(packed, "/mixed_precision")["precisions"].items()}
        full = {p: v["bytes_in_memory"] for p, v in get(decoded, "/mixed_precision")["precisions"].items()}
        assert held["bf16"] == full["bf16"]
        assert held["int4"] < full["int4"] * 0.5 and held["fp8"] < full["fp8"] * 0.75
    finally:
        packed.stop()
        decoded.stop()
