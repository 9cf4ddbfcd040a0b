"""``--tp-size 2`` on the CPU (gloo) serves what ``--tp-size 1`` serves, with both features on.

Six servers of the demo model start at once through the launcher, a TP=1 and a TP=2
server per configuration:

- *all-bf16*: every weight from the bf16 release, served in float32 with expert tracking
  (float32 so that near-ties of the routers cannot flip between the two reduction orders);
- *decoded*: the shipped ``mixed_precision_config.yaml`` (attention bf16, shared experts FP8,
  routed experts GPTQ int4) with ``serve: decoded`` (decoded to bf16 while loading), served in
  bf16. Served packed, the demo's int4 experts (groups of 32 along an intermediate size of 32)
  cannot be cut in two: that start is refused, naming the module and the sizes;
- *packed*: the same mapping with ``serve: packed`` and expert tracking, its routed experts
  quantized again by ``tools/quantize.py`` with groups of 16, so that each rank's half of the
  intermediate size (16) holds whole groups; the shared experts' FP8 blocks of 32 x 32 already
  divide their halves (32). Served in float32 like *all-bf16*: in bf16 two of the random demo
  model's top logits lie within the rounding of the two reduction orders of each other, and a
  greedy token differed between TP=1 and TP=2 (float32 leaves the packed tensors as stored and
  decodes them to float32 to multiply).

What differs between TP=1 and TP=2 is only the order of float additions: each row-parallel
projection (``o_proj``, the experts' and shared expert's ``down_proj``) sums half of its
input on each rank, rounds that partial sum to the serving dtype, and the all-reduce adds
the two halves and rounds again; the all-gathered logits and the vocab-parallel embedding
(one rank holds each row, the others add zeros) are exact. Bounds on the prompt logprobs:

- float32 (``u = 2**-24``): a reordered sum of ``n <= 128`` products moves by at most
  ``n * u * sum|x_i w_i|``, below ``1e-5`` relative; through two layers whose RMS norms
  rescale activations to order 1, and log-softmax moving a logprob by at most twice the
  largest logit change, ``FLOAT32_ATOL = 1e-4`` keeps an order of magnitude over that
  (measured: 5e-7 on both float32 pairs);
- bfloat16 (``u = 2**-8``): the extra roundings of a partial sum and of the all-reduce add
  up to ``2u`` relative to the output of each of the ``R = 4`` row-parallel reductions a
  token passes (2 layers x attention and MoE); propagated to first order like a weight
  error this moves the logits by at most ``2u * R`` of their scale and a logprob by at most
  twice that, so ``bound = 4u * R * spread`` with the spread of the TP=1 prompt logprobs
  standing in for the logit scale (~0.9 nats here, so a bound of ~0.06; measured: 0.002).

A packed module decodes its tensors to the serving dtype and multiplies as a decoded one does,
each rank's partial sum rounded to that dtype before the all-reduce, so the float32 bound holds
for the packed servers as for the all-bf16 ones.
Greedy completions (the official ``openai`` client) are compared token for token, and
the tracker's per (layer, expert) counts must be exactly those of TP=1, with each layer's
tokens equal to the prompt and decode tokens forwarded times top-k: a token counted once.
``/mixed_precision`` sums each rank's bytes in memory, so TP=2 reports TP=1's bytes plus one
more copy of the weights every rank holds whole (see the report test).
First, with no server up, TP sizes that do not divide the model are refused (exit 2)
before SGLang starts, with and without ``--plan``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
import yaml

from .server import REPO, ServerProcess, prompt_logprobs, start_enhanced

pytestmark = pytest.mark.e2e

SHIPPED_CONFIG = REPO / "mixed_precision_config.yaml"
FLOAT32_ATOL = 1e-4
BF16_U = 2.0**-8
ROW_PARALLEL_REDUCTIONS = 4
COMPLETION_PROMPTS = ["The quick brown fox jumps over", "Mixture of experts models route each token",
                      "Attention layers mix information"]  # fmt: skip
COMPLETION_TOKENS = 12
TRACKED_TOKENS = 6
PAIRS = ("all_bf16", "decoded", "packed")
FLOAT32_PAIRS = ("all_bf16", "packed")  # served in float32, with expert tracking
PACKED_GROUP_SIZE = 16
# Weights every rank of SGLang 0.4.7's Qwen2-MoE holds whole: the RMSNorm weights, the router
# (``ReplicatedLinear`` ``mlp.gate``) and the shared expert's gate (a plain ``torch.nn.Linear``).
REPLICATED = re.compile(r"(layernorm|^model\.norm|\.mlp\.gate|\.mlp\.shared_expert_gate)\.weight$")
VOCAB_PADDING = 64  # SGLang pads the vocab-parallel embedding and lm_head to a multiple of this
TRACKING_ARGS = ("--enable-expert-tracking", "--disable-radix-cache", "--disable-overlap-schedule")


@dataclass
class Pair:
    tp1: ServerProcess
    tp2: ServerProcess


def _prompts(tokenizer) -> list[list[int]]:
    text = tokenizer("Mixture of experts models route each token to a few experts. Hello world!").input_ids
    spread = [(37 * i + 11) % 500 + 3 for i in range(40)]
    return [text, spread]


# -- refused before SGLang starts (run first: no server is up meanwhile) ----------------------------


@pytest.mark.parametrize("tp_size, plan", [("3", False), ("8", True)])
def test_tp_size_that_does_not_divide_the_heads_is_refused_before_loading(demo_checkpoints, tp_size, plan) -> None:
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--config", str(SHIPPED_CONFIG),
            "--model", str(demo_checkpoints["bf16"]), "--tp-size", tp_size, *(["--plan"] if plan else [])]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-4000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and "model.layers.0.self_attn" in last
    assert f"num_attention_heads 4 is not a multiple of {tp_size}" in last
    assert "Load weight begin" not in out.stdout + out.stderr


def test_intermediate_size_that_does_not_divide_is_refused(tmp_path) -> None:
    from sglang.srt.enhanced.tools.tiny_models import build_tiny_model

    model = build_tiny_model("qwen2_moe", tmp_path / "model", moe_intermediate_size=18)
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--model", str(model), "--tp-size", "4"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-4000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and "model.layers.0.mlp.experts.0." in last
    assert "intermediate size" in last and "18" in last and "not a multiple of 4" in last
    assert "Load weight begin" not in out.stdout + out.stderr


def shipped_mapping(checkpoints: dict[str, Path], folder: Path, serve: str = "decoded") -> Path:
    """The shipped config reading ``checkpoints`` (precision -> folder, made absolute), served ``serve``."""
    data = yaml.safe_load(SHIPPED_CONFIG.read_text())
    data["mixed_precision"].update({f"{p}_path": str(path) for p, path in checkpoints.items()}, serve=serve)
    path = folder / f"mixed_{serve}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_packed_experts_cut_through_a_group_are_refused(demo_checkpoints) -> None:
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--config", str(SHIPPED_CONFIG),
            "--model", str(demo_checkpoints["bf16"]), "--tp-size", "2", "--plan"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-4000:]
    last = out.stderr.rstrip().splitlines()[-1]
    assert "model.layers.0.mlp.experts.0.down_proj" in last and "16 input features" in last
    assert "quantization group of 32" in last


def test_plan_confirms_a_tp_size_that_divides(demo_checkpoints, tmp_path) -> None:
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--config",
            str(shipped_mapping(demo_checkpoints, tmp_path)), "--model", str(demo_checkpoints["bf16"]),
            "--tp-size", "2", "--plan"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "--tp-size 2: every sharded dimension divides" in out.stdout


# -- TP=2 against TP=1 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoints):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_checkpoints["bf16"]))


@pytest.fixture(scope="module")
def packed_checkpoints(demo_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The demo's bf16 and FP8 folders with a GPTQ int4 copy in groups of 16 (whole groups per TP=2 rank)."""
    from sglang.srt.enhanced.tools.demo import RECIPE
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    int4 = {k: v for k, v in RECIPE["int4"].items() if k != "format"} | {"group_size": PACKED_GROUP_SIZE}
    folder = tmp_path_factory.mktemp("packed") / "gptq-int4-g16"
    quantize_checkpoint(demo_checkpoints["bf16"], folder, RECIPE["int4"]["format"], **int4)
    return {**demo_checkpoints, "int4": folder}


@pytest.fixture(scope="module")
def servers(demo_checkpoints, packed_checkpoints, tmp_path_factory) -> dict[str, Pair]:
    work = tmp_path_factory.mktemp("tensor-parallel")
    bf16 = demo_checkpoints["bf16"]
    all_bf16 = work / "all_bf16.yaml"
    all_bf16.write_text(yaml.safe_dump({"mixed_precision": {"bf16_path": str(bf16), "weight_mapping": {"*": "bf16"}}}))
    decoded = shipped_mapping(demo_checkpoints, work)
    packed = shipped_mapping(packed_checkpoints, work, serve="packed")
    launches = {
        key: ("--tp-size", str(tp), *args)
        for tp in (1, 2)
        for key, args in (
            (("all_bf16", tp), ("--dtype", "float32", *TRACKING_ARGS, "--config", str(all_bf16))),
            (("decoded", tp), ("--config", str(decoded))),
            (("packed", tp), ("--dtype", "float32", *TRACKING_ARGS, "--config", str(packed))),
        )
    }
    started: list[ServerProcess] = []

    def ready(key: tuple[str, int]) -> ServerProcess:
        # A TP=2 server's gloo connections take ephemeral ports; another server's chosen HTTP
        # port may be among them by the time it binds: wait_ready then starts it again on a new port.
        server = start_enhanced(bf16, work, *launches[key], name=f"{key[0]}-tp{key[1]}")
        started.append(server)
        return server.wait_ready(timeout=420)

    try:
        with ThreadPoolExecutor(len(launches)) as pool:
            ready_servers = dict(zip(launches, pool.map(ready, launches), strict=True))
        yield {name: Pair(ready_servers[(name, 1)], ready_servers[(name, 2)]) for name in PAIRS}
    finally:
        for server in started:
            server.stop()


def _logprobs(server: ServerProcess, prompts: list[list[int]]) -> list[float]:
    return [lp for ids in prompts for lp in prompt_logprobs(server.base_url, ids)]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_tp2_runs_two_ranks_through_gloo(servers) -> None:
    for pair in servers.values():
        log = pair.tp2.log()
        assert "TP1]" in log and "Load weight end" in log
        assert "intel_extension_for_pytorch" not in log


@pytest.mark.parametrize("name", FLOAT32_PAIRS)
def test_float32_prompt_logprobs_within_float32_rounding(servers, tokenizer, name: str) -> None:
    pair = servers[name]
    prompts = _prompts(tokenizer)
    tp1, tp2 = _logprobs(pair.tp1, prompts), _logprobs(pair.tp2, prompts)
    assert _max_diff(tp1, tp2) <= FLOAT32_ATOL


def test_decoded_prompt_logprobs_within_bf16_rounding(servers, tokenizer) -> None:
    pair = servers["decoded"]
    prompts = _prompts(tokenizer)
    tp1, tp2 = _logprobs(pair.tp1, prompts), _logprobs(pair.tp2, prompts)
    spread = max(tp1) - min(tp1)
    bound = 4 * BF16_U * ROW_PARALLEL_REDUCTIONS * spread
    assert _max_diff(tp1, tp2) <= bound, (bound, spread)


@pytest.mark.parametrize("name", PAIRS)
def test_greedy_completions_identical(servers, name: str) -> None:
    def complete(server: ServerProcess) -> list[str]:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        replies = [client.completions.create(model="default", prompt=p, max_tokens=COMPLETION_TOKENS,
                                             temperature=0, extra_body={"ignore_eos": True})
                   for p in COMPLETION_PROMPTS]  # fmt: skip
        assert all(r.usage.completion_tokens == COMPLETION_TOKENS for r in replies)
        return [r.choices[0].text for r in replies]

    pair = servers[name]
    assert complete(pair.tp2) == complete(pair.tp1)


def _tracked_counts(server: ServerProcess, prompts: list[list[int]]) -> dict:
    assert requests.post(server.base_url + "/expert_stats/reset", timeout=60).status_code == 200
    for ids in prompts:
        r = requests.post(server.base_url + "/generate", json={
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": TRACKED_TOKENS, "temperature": 0, "ignore_eos": True},
        }, timeout=300)  # fmt: skip
        assert r.status_code == 200, r.text
    return requests.get(server.base_url + "/expert_stats", timeout=60).json()


@pytest.mark.parametrize("name", FLOAT32_PAIRS)
def test_tracker_counts_equal_tp1_and_count_each_token_once(servers, tokenizer, name: str) -> None:
    pair = servers[name]
    prompts = _prompts(tokenizer)
    tp1, tp2 = _tracked_counts(pair.tp1, prompts), _tracked_counts(pair.tp2, prompts)
    fields = ("activation_count", "total_tokens_processed", "prefill_tokens", "decode_tokens",
              "prefill_activations", "decode_activations")  # fmt: skip
    for stats in (tp1, tp2):
        top_k = stats["summary"]["top_k"]
        for layer in stats["layer_stats"].values():
            experts = layer["experts"].values()
            # Every prompt token is prefilled; each request then decodes TRACKED_TOKENS - 1 tokens.
            assert sum(e["prefill_tokens"] for e in experts) == top_k * sum(len(p) for p in prompts)
            assert sum(e["decode_tokens"] for e in experts) == top_k * len(prompts) * (TRACKED_TOKENS - 1)
    counts = {
        stats_name: {key: tuple(entry[f] for f in fields) for key, entry in stats["expert_stats"].items()}
        for stats_name, stats in (("tp1", tp1), ("tp2", tp2))
    }
    assert counts["tp1"] and counts["tp2"] == counts["tp1"]


def _replicated_bytes(model: Path, element_size: int) -> int:
    """Bytes in memory (``element_size`` per value) of the checkpoint weights every TP rank holds whole."""
    from safetensors import safe_open

    config = json.loads((model / "config.json").read_text())
    # Preconditions for "every other weight is tiled by the ranks' pieces" at TP=2.
    assert config["num_key_value_heads"] % 2 == 0 and config["vocab_size"] % VOCAB_PADDING == 0
    assert config["vocab_size"] // 2 % VOCAB_PADDING == 0
    shapes = {}
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            shapes |= {name: f.get_slice(name).get_shape() for name in f.keys()}
    replicated = [shape for name, shape in shapes.items() if REPLICATED.search(name)]
    assert len(replicated) == 4 * config["num_hidden_layers"] + 1  # 2 norms, 2 gates a layer; the final norm
    return sum(element_size * math.prod(shape) for shape in replicated)


@pytest.mark.parametrize("name", PAIRS)
def test_mixed_precision_report_sums_bytes_over_ranks(servers, demo_checkpoints, name: str) -> None:
    """TP=2 reports, per precision, TP=1's bytes in memory + (TP - 1) x the bytes of the weights
    every rank holds whole (:data:`REPLICATED`, all bf16 in every mapping here, held in the
    serving dtype: float32 or bf16); ``tensors``, ``bytes_on_disk`` and the modules are those of TP=1.

    SGLang cuts every other parameter into pieces that tile it: q/k/v by heads (two key/value
    heads, one a rank), ``o_proj`` and the down projections by input, gate/up by output, the
    embedding and ``lm_head`` by rows (512, so each rank's 256 need no padding rows); packed
    tensors are cut in whole groups, words and scale blocks, and their identity ``g_idx`` dropped.
    """
    pair = servers[name]
    tp1, tp2 = (requests.get(s.base_url + "/mixed_precision", timeout=60).json() for s in (pair.tp1, pair.tp2))
    element_size = 4 if name in FLOAT32_PAIRS else 2  # served in float32 / bf16
    replicated = _replicated_bytes(demo_checkpoints["bf16"], element_size)
    expected = {
        p: {**v, "bytes_in_memory": v["bytes_in_memory"] + (replicated if p == "bf16" else 0)}
        for p, v in tp1["precisions"].items()
    }
    assert tp2["precisions"] == expected
    assert tp2["modules"] == tp1["modules"] and tp2["serve"] == tp1["serve"]
    if name == "packed":  # really served packed at both sizes
        methods = {m: tp2["modules"][f"model.layers.0.mlp.{m}"]["method"]
                   for m in ("experts", "shared_expert.gate_up_proj", "shared_expert.down_proj")}  # fmt: skip
        assert methods == {"experts": f"gptq-4bit-g{PACKED_GROUP_SIZE}", "shared_expert.gate_up_proj": "fp8-block32x32",
                           "shared_expert.down_proj": "fp8-block32x32"}  # fmt: skip
