"""Expert counts of SGLang's DeepSeek-V3 MoE layer equal those of transformers' router.

SGLang 0.4.7 will not serve DeepSeek-V2/V3 on CPU (MLA needs the intel_amx backend), so
the model is built in-process instead: SGLang's ``DeepseekV3ForCausalLM`` for a tiny
config (8 routed experts in 4 groups, 2 groups per token, one shared expert, layer 0
dense), filled by its own ``load_weights`` from a seeded transformers model whose router
has a non-zero ``e_score_correction_bias``. The recorder is installed as the server
installs it, and passes of random hidden states run through the MoE block of layer 1
(SGLang's grouped, biased top-k inside ``select_experts``). The reference is the
transformers router (``DeepseekV3TopkRouter``) on the same hidden states.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from .server import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(torch.cuda.is_available(), reason="builds SGLang's CPU path in-process"),
]

MOE_LAYER = 1
NUM_EXPERTS = 8
TOP_K = 2
# (tokens, is_decode) of each forward pass
PASSES = [(13, False), (4, True), (7, False), (3, True), (5, False)]


def capturing_recorder():
    """A recorder in SGLang's own place that keeps every ``topk_ids`` it is handed."""
    from sglang.srt.managers.expert_distribution import ExpertDistributionRecorder

    class Capturing(ExpertDistributionRecorder):
        def __init__(self) -> None:
            self.calls: list[torch.Tensor] = []

        def on_select_experts(self, topk_ids: torch.Tensor) -> None:
            self.calls.append(topk_ids.clone())

    return Capturing()


@pytest.fixture(scope="module")
def sglang_cpu():
    """SGLang's parallel state for one CPU process and the server args DeepSeek's layers read.

    The parallel state is set up once per process and left up: a module that finds it
    initialized reuses it.
    """
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers import dp_attention
    from sglang.srt.managers.schedule_batch import GLOBAL_SERVER_ARGS_KEYS, global_server_args_dict
    from sglang.srt.server_args import ServerArgs

    if not parallel_state.model_parallel_is_initialized():
        # Skips the process group itself when torch.distributed is already initialized.
        parallel_state.init_distributed_environment(
            backend="gloo", world_size=1, rank=0, local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
        )
        parallel_state.initialize_model_parallel(1)
    try:
        dp_attention.get_attention_tp_rank()
    except AssertionError:
        dp_attention.initialize_dp_attention(
            enable_dp_attention=False, tp_rank=0, tp_size=1, dp_size=1, moe_dense_tp_size=None, pp_size=1
        )
    with pytest.MonkeyPatch.context() as mp:
        # Defaults of a plain ``--device cpu`` launch, restored afterwards (building the model
        # also writes one: it turns shared-expert fusion off where there is no CUDA).
        for key in GLOBAL_SERVER_ARGS_KEYS:
            mp.setitem(global_server_args_dict, key, getattr(ServerArgs, key))
        mp.setitem(global_server_args_dict, "device", "cpu")
        yield


@pytest.fixture(scope="module")
def deepseek(sglang_cpu, tmp_path_factory):
    """The transformers reference model and the SGLang ``ModelConfig`` of the same config."""
    from transformers import DeepseekV3ForCausalLM

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.enhanced.tools.tiny_models import tiny_config

    # topk_method and moe_layer_freq are keys of DeepSeek-V3's own config.json that SGLang reads.
    config = tiny_config("deepseek_v3", n_routed_experts=NUM_EXPERTS, n_group=4, topk_group=2,
                         num_experts_per_tok=TOP_K, topk_method="noaux_tc", moe_layer_freq=1)
    config.architectures = ["DeepseekV3ForCausalLM"]
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        gate = hf.model.layers[MOE_LAYER].mlp.gate
        gate.weight.normal_(0.0, 0.5)
        # Non-negative, so every candidate's biased score stays above the 0.0 that transformers
        # writes into the groups it leaves out (SGLang writes -inf there).
        gate.e_score_correction_bias.uniform_(0.0, 0.3)
    model_dir = tmp_path_factory.mktemp("deepseek-v3-config")
    config.save_pretrained(model_dir)
    model_config = ModelConfig(str(model_dir), dtype="float32", model_override_args="{}")
    return SimpleNamespace(hf=hf, model_config=model_config)


def build_sglang_model(deepseek):
    """SGLang's DeepSeek-V3 model on CPU, filled by its own ``load_weights``."""
    import sglang.srt.layers.moe.fused_moe_triton.layer  # noqa: F401 - routes MoE to the native path on CPU
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.models.deepseek_v2 import DeepseekV3ForCausalLM

    with set_default_torch_dtype(deepseek.model_config.dtype):
        model = DeepseekV3ForCausalLM(deepseek.model_config.hf_config)
    model.load_weights(list(deepseek.hf.state_dict().items()))
    return model.eval()


@contextmanager
def global_recorder(recorder) -> Iterator[None]:
    from sglang.srt.enhanced.moe_tracker.tracker import set_global_expert_tracker
    from sglang.srt.managers.expert_distribution import (
        get_global_expert_distribution_recorder,
        set_global_expert_distribution_recorder,
    )

    previous = get_global_expert_distribution_recorder()
    set_global_expert_distribution_recorder(recorder)
    try:
        yield
    finally:
        set_global_expert_distribution_recorder(previous)
        set_global_expert_tracker(None)


def forward_batch(num_tokens: int, is_decode: bool) -> SimpleNamespace:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(
        input_ids=torch.zeros(num_tokens, dtype=torch.long),
        forward_mode=ForwardMode.DECODE if is_decode else ForwardMode.EXTEND,
    )


def hidden_states() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(n, 64, generator=gen) for n, _ in PASSES]


def reference_topk(hf, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' DeepSeek-V3 routing: indices ``[tokens, top_k]``."""
    with torch.no_grad():
        indices, _ = hf.model.layers[MOE_LAYER].mlp.gate(hidden)
    return indices


def reference_counts(topk: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and active passes per ``[phase, expert]`` (phase 0 = prefill, 1 = decode)."""
    tokens = torch.zeros(2, NUM_EXPERTS, dtype=torch.long)
    active = torch.zeros(2, NUM_EXPERTS, dtype=torch.long)
    for ids, (_, is_decode) in zip(topk, PASSES, strict=True):
        hist = torch.bincount(ids.reshape(-1), minlength=NUM_EXPERTS)
        tokens[int(is_decode)] += hist
        active[int(is_decode)] += (hist > 0).long()
    return tokens, active


def test_reference_needs_bias_and_groups(deepseek):
    """The data exercises both the correction bias and the group limit (else equality proves less)."""
    hf = deepseek.hf
    unbiased = copy.deepcopy(hf)
    unbiased.model.layers[MOE_LAYER].mlp.gate.e_score_correction_bias.zero_()
    gate = hf.model.layers[MOE_LAYER].mlp.gate
    bias_changes, groups_change = 0, 0
    for hidden in hidden_states():
        chosen = reference_topk(hf, hidden).sort(dim=-1).values
        without_bias = reference_topk(unbiased, hidden).sort(dim=-1).values
        scores = torch.sigmoid(hidden @ gate.weight.T) + gate.e_score_correction_bias
        ungrouped = scores.topk(TOP_K, dim=-1).indices.sort(dim=-1).values
        bias_changes += int((chosen != without_bias).any(dim=-1).sum())
        groups_change += int((chosen != ungrouped).any(dim=-1).sum())
    assert bias_changes > 0
    assert groups_change > 0


def test_deepseek_counts_match_transformers(deepseek):
    from sglang.srt.enhanced.moe_tracker.sglang_adapter import install_tracking_recorder
    from sglang.srt.enhanced.moe_tracker.snapshot import DECODE, PREFILL
    from sglang.srt.enhanced.moe_tracker.tracker import get_global_expert_tracker
    from sglang.srt.enhanced.settings import LaunchSettings
    from sglang.srt.managers.expert_distribution import get_global_expert_distribution_recorder

    model = build_sglang_model(deepseek)
    moe, hf_moe = model.model.layers[MOE_LAYER].mlp, deepseek.hf.model.layers[MOE_LAYER].mlp
    inner = capturing_recorder()
    with global_recorder(inner):
        recorder = install_tracking_recorder(model, deepseek.model_config, LaunchSettings(expert_tracking=True))
        assert get_global_expert_distribution_recorder() is recorder
        assert get_global_expert_tracker() is recorder.tracker
        expected_topk = []
        with torch.no_grad():
            for pass_id, (hidden, (n, is_decode)) in enumerate(zip(hidden_states(), PASSES, strict=True)):
                with recorder.with_forward_pass(pass_id, forward_batch(n, is_decode)):
                    out = moe(hidden)
                torch.testing.assert_close(out, hf_moe(hidden[None])[0], rtol=1e-4, atol=1e-5)
                expected_topk.append(reference_topk(deepseek.hf, hidden))
        snap = recorder.snapshot()
        stats = recorder.tracker.get_expert_stats()

    # SGLang's own recorder still sees every routing decision, one call per pass (one MoE layer).
    assert len(inner.calls) == len(PASSES)
    for got, want in zip(inner.calls, expected_topk, strict=True):
        assert torch.equal(got.long().sort(dim=-1).values, want.sort(dim=-1).values)

    tokens, active = reference_counts(expected_topk)
    assert snap.layer_ids == [MOE_LAYER]  # layer 0 is dense (first_k_dense_replace=1)
    assert (snap.num_experts, snap.top_k) == (NUM_EXPERTS, TOP_K)
    assert torch.equal(snap.tokens[:, MOE_LAYER], tokens)
    assert torch.equal(snap.activations[:, MOE_LAYER], active)
    assert not snap.tokens[:, 0].any() and not snap.activations[:, 0].any()
    decode_passes = sum(is_decode for _, is_decode in PASSES)
    assert snap.num_passes == {"prefill": len(PASSES) - decode_passes, "decode": decode_passes}

    assert list(stats["layer_stats"]) == [str(MOE_LAYER)]
    experts = stats["layer_stats"][str(MOE_LAYER)]["experts"]
    for key, table in (("tokens", tokens), ("activations", active)):
        for phase, name in ((PREFILL, "prefill"), (DECODE, "decode")):
            got = [experts[str(e)][f"{name}_{key}"] for e in range(NUM_EXPERTS)]
            assert got == table[phase].tolist(), f"{name}_{key}"
    assert stats["layer_stats"][str(MOE_LAYER)]["total_tokens"] == TOP_K * sum(n for n, _ in PASSES)
    assert all(k.startswith(f"layer_{MOE_LAYER}_") for k in stats["expert_stats"])


def test_nothing_recorded_without_layer_hooks(deepseek):
    from sglang.srt.enhanced.moe_tracker.sglang_adapter import TrackingRecorder, moe_layer_modules
    from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker

    model = build_sglang_model(deepseek)
    moe = model.model.layers[MOE_LAYER].mlp
    assert moe_layer_modules(model) == {MOE_LAYER: moe.experts}  # the FusedMoE at model.layers.1.mlp.experts
    (hidden, *_), (n, is_decode) = hidden_states(), PASSES[0]
    tracker = ExpertActivationTracker(num_layers=2, num_experts=NUM_EXPERTS, top_k=TOP_K, layer_ids=[MOE_LAYER])
    inner = capturing_recorder()
    recorder = TrackingRecorder(inner, tracker, None)
    with global_recorder(recorder), torch.no_grad():
        handles = recorder.attach(model)
        assert len(handles) == 1
        for handle in handles:
            handle.remove()
        with recorder.with_forward_pass(0, forward_batch(n, is_decode)):
            moe(hidden)
        assert len(inner.calls) == 1  # select_experts ran and reached the recorder ...
        assert not tracker.snapshot().tokens.any()  # ... but without a layer nothing is counted

        recorder.attach(model)
        with recorder.with_forward_pass(1, forward_batch(n, is_decode)):
            moe(hidden)
    expected = torch.bincount(reference_topk(deepseek.hf, hidden).reshape(-1), minlength=NUM_EXPERTS)
    assert torch.equal(tracker.snapshot().tokens[int(is_decode), MOE_LAYER], expected)
