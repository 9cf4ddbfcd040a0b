"""Hooks on Hugging Face MoE models record the routing the models really do.

The reference never goes through the tracker's hooks: it re-runs each layer's router on
the hidden states the test captures itself (or uses the model's own router logits).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.moe_tracker.hf_adapter import attach_hf_model, find_moe_layers, routed_ids
from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL, TrackerSnapshot
from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker
from sglang.srt.enhanced.tools.tiny_models import tiny_config

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"]
SOFTMAX_ARCHS = {"qwen2_moe", "qwen3_moe", "mixtral", "olmoe"}
TOP_K = 2
# DeepSeek-V3 gets 8 experts in 4 groups (2 kept), so group-limited routing really limits: with
# 4 experts in 2 groups and top-2, every token would take a whole group.
OVERRIDES = {"deepseek_v3": {"n_routed_experts": 8, "n_group": 4, "topk_group": 2}}


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(request.param)
    for key, value in OVERRIDES.get(request.param, {}).items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0.0, 0.5)  # spread tokens over the experts
            if name.endswith("e_score_correction_bias"):
                param.uniform_(0.0, 0.1)
    model.arch = request.param
    model.num_experts = 8 if request.param == "deepseek_v3" else 4
    return model


def _moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> MoE block, found from the model's own layout."""
    blocks = {}
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        if hasattr(block, "experts"):
            blocks[i] = block
    return blocks


def _reference_ids(arch: str, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The experts ``block`` routes ``hidden`` to, recomputed from its router weights."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if arch in SOFTMAX_ARCHS:
        probs = F.softmax(F.linear(h, block.gate.weight), dim=-1, dtype=torch.float)
        return probs.topk(TOP_K, dim=-1).indices
    # DeepSeek-V3: sigmoid scores + bias; keep the best topk_group groups (group score = sum of
    # its two best experts), then the top-k experts inside them.
    gate = block.gate
    scores = torch.sigmoid(F.linear(h.float(), gate.weight.float())) + gate.e_score_correction_bias
    grouped = scores.view(h.shape[0], gate.n_group, -1)
    group_score = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
    keep = group_score.argsort(dim=-1, descending=True)[:, : gate.topk_group]
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep, True)
    masked = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(h.shape[0], -1)
    return masked.argsort(dim=-1, descending=True)[:, :TOP_K]


class Capture:
    """The test's own pre-hooks on the MoE blocks: the hidden states of every call."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[int, list[torch.Tensor]] = {i: [] for i in _moe_blocks(model)}
        self._handles = [
            block.register_forward_pre_hook(
                lambda mod, args, i=i: self.calls[i].append(args[0].detach().clone())
            )
            for i, block in _moe_blocks(model).items()
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _reference_counts(
    model: nn.Module, calls: dict[int, list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-phase tokens and activations [2, layers, experts] from captured calls."""
    num_layers = len(model.model.layers)
    tokens = torch.zeros(2, num_layers, model.num_experts, dtype=torch.int64)
    acts = torch.zeros_like(tokens)
    blocks = _moe_blocks(model)
    for layer, hiddens in calls.items():
        for i, hidden in enumerate(hiddens):
            phase = DECODE if i > 0 and hidden.shape[1] == 1 else PREFILL
            ids = _reference_ids(model.arch, blocks[layer], hidden)
            hist = torch.zeros(model.num_experts, dtype=torch.int64)
            for e in ids.flatten().tolist():
                hist[e] += 1
            tokens[phase, layer] += hist
            acts[phase, layer] += (hist > 0).long()
    return tokens, acts


@pytest.fixture
def tracked(model: nn.Module) -> Iterator[tuple[nn.Module, ExpertActivationTracker]]:
    handle = attach_hf_model(model)
    yield model, handle.tracker
    handle.remove()


def test_finds_moe_layers(model: nn.Module) -> None:
    _, layers = find_moe_layers(model)
    assert [m.layer_id for m in layers] == sorted(_moe_blocks(model))
    assert all((m.num_experts, m.top_k) == (model.num_experts, TOP_K) for m in layers)
    if model.arch == "deepseek_v3":
        assert [m.layer_id for m in layers] == [1]  # layer 0 is dense


def test_forward_counts_match_router(tracked: tuple[nn.Module, ExpertActivationTracker]) -> None:
    model, tracker = tracked
    input_ids = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(1))
    capture = Capture(model)
    try:
        with torch.no_grad():
            out = model(input_ids, output_router_logits=model.arch in SOFTMAX_ARCHS)
    finally:
        capture.remove()
    snap = tracker.snapshot()
    ref_tokens, ref_acts = _reference_counts(model, capture.calls)
    assert snap.tokens.equal(ref_tokens)
    assert snap.activations.equal(ref_acts)
    if model.arch in SOFTMAX_ARCHS:
        # The model's own router logits give the same counts.
        for layer, logits in zip(sorted(_moe_blocks(model)), out.router_logits, strict=True):
            ids = F.softmax(logits, dim=-1, dtype=torch.float).topk(TOP_K, dim=-1).indices
            assert snap.tokens[PREFILL, layer].tolist() == [
                int((ids == e).sum()) for e in range(model.num_experts)
            ]
    for layer in range(len(model.model.layers)):
        expected = input_ids.numel() * TOP_K if layer in _moe_blocks(model) else 0
        assert snap.tokens[:, layer].sum().item() == expected
    assert snap.num_passes == {"prefill": 1, "decode": 0}
    assert snap.layer_ids == sorted(_moe_blocks(model))


def test_generate_splits_prefill_and_decode(tracked: tuple[nn.Module, ExpertActivationTracker]) -> None:
    model, tracker = tracked
    batch, prompt, new = 2, 5, 4
    input_ids = torch.randint(3, 500, (batch, prompt), generator=torch.Generator().manual_seed(2))
    capture = Capture(model)
    try:
        with torch.no_grad():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        capture.remove()
    snap = tracker.snapshot()
    ref_tokens, ref_acts = _reference_counts(model, capture.calls)
    assert snap.tokens.equal(ref_tokens)
    assert snap.activations.equal(ref_acts)
    assert snap.num_passes == {"prefill": 1, "decode": new - 1}
    for layer in _moe_blocks(model):
        assert snap.tokens[PREFILL, layer].sum().item() == batch * prompt * TOP_K
        assert snap.tokens[DECODE, layer].sum().item() == batch * (new - 1) * TOP_K
        assert snap.activations[:, layer].max().item() <= new - 1


def test_inputs_embeds_forward(tracked: tuple[nn.Module, ExpertActivationTracker]) -> None:
    model, tracker = tracked
    with torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])))
    snap = tracker.snapshot()
    assert [snap.tokens[PREFILL, layer].sum().item() for layer in _moe_blocks(model)] == [8 * TOP_K] * len(
        _moe_blocks(model)
    )
    assert snap.num_passes == {"prefill": 1, "decode": 0}


def test_remove_detaches_and_failed_forward_is_dropped(model: nn.Module) -> None:
    handle = attach_hf_model(model)
    tracker = handle.tracker
    with torch.no_grad():
        with pytest.raises(IndexError):
            model(torch.tensor([[1, 10_000]]))  # out of vocabulary: the forward raises
        assert not tracker.in_pass
        model(torch.tensor([[1, 2, 3]]))
    before: TrackerSnapshot = tracker.snapshot()
    assert before.tokens.sum().item() == 3 * TOP_K * len(_moe_blocks(model))
    assert before.num_passes["prefill"] == 1
    handle.remove()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert tracker.snapshot().tokens.equal(before.tokens)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_tracker_too_small_and_router_outputs() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("olmoe"), torch_dtype=torch.float32)
    with pytest.raises(EnhancedError) as err:
        attach_hf_model(model, ExpertActivationTracker(2, 2, 2))
    assert err.value.culprit == (0, None)
    ids = torch.tensor([[3, 1], [0, 2]])
    assert routed_ids((ids, torch.rand(2, 2)), 2, 4).equal(ids)
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5]])
    assert routed_ids(logits, 2, 4).tolist() == [[1, 3]]
    with pytest.raises(EnhancedError) as err:
        routed_ids(torch.rand(2, 5), 2, 4, layer_id=3)
    assert err.value.culprit == (3, None)
