"""The real cuda/cpu mismatch on tiny MoE models: it breaks forward, is found, fixed, and generate runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fix_device_issues import (
    EnhancedError,
    comprehensive_device_fix,
    create_proper_attention_mask,
    find_moe_blocks,
    fix_moe_device_issues,
    validate_model_device_consistency,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")

EOS = 1


def make_tokenizer(padding_side: str = "left"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": EOS, **{f"w{i}": i + 2 for i in range(60)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    tok.padding_side = padding_side
    return tok


def make_model(arch: str) -> nn.Module:
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, eos_token_id=EOS, bos_token_id=None,
                  pad_token_id=None)
    torch.manual_seed(0)
    if arch == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=4, **common))
    else:
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=32, num_local_experts=4, **common))
    return model.float().eval()


def stray_expert(model: nn.Module) -> tuple[str, nn.Module]:
    """Expert 1 of the first MoE block (transformers 4.x), or its fused expert module (5.x)."""
    block = find_moe_blocks(model)[0]
    experts = model.get_submodule(block).experts
    if isinstance(experts, nn.ModuleList):
        return f"{block}.experts.1", experts[1]
    return f"{block}.experts", experts


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_cuda_cpu_mismatch_found_and_fixed(arch):
    model = make_model(arch).to("cuda")
    ids = torch.randint(2, 62, (2, 32), generator=torch.Generator().manual_seed(1)).to("cuda")
    with torch.no_grad():
        reference = model(ids).logits

    name, expert = stray_expert(model)
    expert.to("cpu")
    with pytest.raises(RuntimeError, match="same device|device"):
        with torch.no_grad():
            model(ids)

    expert_names = {f"{name}.{n}" for n, _ in expert.named_parameters()}
    for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
        result = validate_model_device_consistency(model, device)
        assert result["is_consistent"] is False
        assert {i["name"] for i in result["issues"]} == expert_names
        assert {i["device"] for i in result["issues"]} == {"cpu"}

    assert fix_moe_device_issues(model, "cuda") is model
    assert validate_model_device_consistency(model, "cuda:0") == {
        "is_consistent": True, "device": "cuda:0", "issues": []}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference)


def test_comprehensive_fix_then_generate():
    model = make_model("qwen2_moe").to("cuda")
    tok = make_tokenizer("left")
    name, expert = stray_expert(model)
    expert.to("cpu")
    model.model.rotary_emb.to("cpu")
    expected = {f"{name}.{n}" for n, _ in expert.named_parameters()}
    expected |= {f"model.rotary_emb.{n}" for n, _ in model.model.rotary_emb.named_buffers()}

    report = comprehensive_device_fix(model, tok, "cuda")

    assert set(report["moved"]) == expected
    assert report["is_consistent"] and report["remaining_issues"] == []
    assert report["device"] == "cuda:0"
    assert report["pad_token_set"] and tok.pad_token_id == EOS == model.generation_config.pad_token_id

    enc = tok(["w1 w2 </s> w3 w4", "w5"], padding=True, return_tensors="pt")
    ids = enc["input_ids"].to("cuda")
    mask = create_proper_attention_mask(ids, tok, "cuda")
    assert mask.device.type == "cuda"
    assert torch.equal(mask.cpu(), enc["attention_mask"])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)
    # The padded row generates what it generates alone.
    alone = tok(["w5"], return_tensors="pt")["input_ids"].to("cuda")
    out_alone = model.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=4, do_sample=False)
    assert torch.equal(out[1, -4:], out_alone[0, -4:])


def test_missing_cuda_index_is_named():
    device = f"cuda:{torch.cuda.device_count()}"
    model = make_model("mixtral")
    with pytest.raises(EnhancedError, match=device):
        validate_model_device_consistency(model, device)
    with pytest.raises(EnhancedError, match=device):
        fix_moe_device_issues(model, device)
