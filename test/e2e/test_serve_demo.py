"""The shipped ``mixed_precision_config.yaml`` serves the demo model through the launcher.

The demo is built in ``<repo>/demo`` (as ``python -m sglang.srt.enhanced.tools.demo --out
demo`` would), the config file is used as shipped, and the official ``openai`` client
talks to the server.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import openai
import pytest
import requests
from safetensors import safe_open

from .server import REPO, start_enhanced

pytestmark = pytest.mark.e2e

CONFIG = REPO / "mixed_precision_config.yaml"
# Size the KV pool by tokens rather than by a fraction of the RAM that happens to be free.
MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]
PROMPT = "The quick brown fox jumps over"


def hand_precision(name: str) -> str:
    """The shipped rules, applied by hand: attention bf16, routed experts int4, other MLP projections fp8."""
    if ".self_attn." in name:
        return "bf16"
    if ".mlp.experts." in name and name.endswith("_proj.weight"):
        return "int4"
    if ".mlp." in name and name.endswith("_proj.weight"):
        return "fp8"
    return "bf16"  # embeddings, lm_head, norms, router gates: the default (bf16_path)


@pytest.fixture(scope="module")
def plan_run(demo_checkpoints):
    """``launch_enhanced_server.py --plan`` (no server), started at once to overlap the server start."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch_enhanced_server.py"), "--config", str(CONFIG),
         "--model", str(demo_checkpoints["bf16"]), "--plan"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def server(demo_checkpoints, plan_run, tmp_path_factory):
    srv = start_enhanced(
        demo_checkpoints["bf16"], tmp_path_factory.mktemp("serve-demo"), config=CONFIG
    )
    with srv:
        yield srv.wait_ready()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoints):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_checkpoints["bf16"]))


def test_health(server) -> None:
    assert requests.get(server.base_url + "/health", timeout=10).status_code == 200


def test_server_loaded_each_precision_from_its_folder(server, demo_checkpoints) -> None:
    with safe_open(str(demo_checkpoints["bf16"] / "model.safetensors"), "pt") as f:
        expected = Counter(hand_precision(n) for n in f.keys())
    line = next(ln for ln in server.log().splitlines() if "Mixed-precision load:" in ln)
    loaded = {p: int(n) for p, n in re.findall(r"(\w+): (\d+) tensors", line)}
    assert loaded == dict(expected)


def test_chat_completion(client: openai.OpenAI, tokenizer) -> None:
    reply = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + 7
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)


def test_text_completion(client: openai.OpenAI, tokenizer) -> None:
    reply = client.completions.create(
        model="default", prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert reply.choices[0].finish_reason == "length"
    assert isinstance(reply.choices[0].text, str)


def test_plan_counts_match_the_rules(plan_run, demo_checkpoints) -> None:
    stdout, stderr = plan_run.communicate(timeout=300)
    assert plan_run.returncode == 0, stderr[-4000:]
    rows = re.findall(r"^(bf16|fp16|fp32|fp8|int4)\s+(/\S+)\s+(\d+)\s", stdout, flags=re.MULTILINE)
    with safe_open(str(demo_checkpoints["bf16"] / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    # 2 layers x (q/k/v/o weights + q/k/v biases) + embeddings, lm_head, final norm and per layer
    # 2 norms, the router gate and the shared-expert gate: 14 + 3 + 8 = 25 bf16; 2 x 3 shared-expert
    # projections fp8; 2 layers x 4 experts x 3 projections int4.
    assert Counter(hand_precision(n) for n in names) == {"bf16": 25, "fp8": 6, "int4": 24}
    assert {p: int(n) for p, _folder, n in rows} == dict(Counter(hand_precision(n) for n in names))
    assert {p: Path(folder) for p, folder, _n in rows} == {
        p: path.resolve() for p, path in demo_checkpoints.items()
    }
