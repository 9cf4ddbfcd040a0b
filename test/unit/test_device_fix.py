"""Device-consistency helpers on tiny transformers MoE models (CPU; "meta" plays the second device)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fix_device_issues import (
    EnhancedError,
    comprehensive_device_fix,
    create_proper_attention_mask,
    find_moe_blocks,
    fix_moe_device_issues,
    move_moe_blocks,
    validate_model_device_consistency,
)
from sglang.srt.enhanced.tools.tiny_models import tiny_config

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
EOS = 1  # id of "</s>" in the tokenizer below


def make_tokenizer(*, with_pad: bool = True, padding_side: str = "right"):
    """A word-level tokenizer over "w0".."w59" whose eos is "</s>"; pad == eos when ``with_pad``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": EOS, **{f"w{i}": i + 2 for i in range(60)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    if with_pad:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def make_model(arch: str, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), torch_dtype=torch.float32)
    return model.eval()


def one_expert(model: nn.Module, layer: int = 0) -> tuple[str, nn.Module]:
    """Expert 1 of ``layer`` (transformers 4.x), or the layer's fused expert module (5.x)."""
    block_name = [b for b in find_moe_blocks(model) if b.startswith(f"model.layers.{layer}.")][0]
    experts = model.get_submodule(block_name).experts
    if isinstance(experts, nn.ModuleList):
        return f"{block_name}.experts.1", experts[1]
    return f"{block_name}.experts", experts


def tensor_names(module: nn.Module, prefix: str) -> set[str]:
    names = {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    return names | {f"{prefix}.{n}" for n, _ in module.named_buffers()}


def moe_reference_names(model: nn.Module) -> set[str]:
    """MoE tensors by class name, independently of the structural detection under test."""
    blocks = [n for n, m in model.named_modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoE"))]
    return set().union(*(tensor_names(model.get_submodule(b), b) for b in blocks))


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_moe_blocks_recognised(arch):
    model = make_model(arch)
    expected = [n for n, m in model.named_modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoE"))]
    first_moe_layer = 1 if arch == "deepseek_v3" else 0  # DeepSeek-V3's first layer is dense here
    assert len(expected) == 2 - first_moe_layer
    assert find_moe_blocks(model) == expected


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_validate_names_exactly_the_stray_tensors(arch):
    model = make_model(arch)
    assert validate_model_device_consistency(model, "cpu") == {"is_consistent": True, "device": "cpu", "issues": []}
    assert validate_model_device_consistency(model, "cpu:0")["is_consistent"]

    name, expert = one_expert(model)
    expert.to("meta")
    model.model.rotary_emb.to("meta")  # non-persistent inv_freq buffer(s): absent from state_dict
    expected = tensor_names(expert, name) | tensor_names(model.model.rotary_emb, "model.rotary_emb")
    assert "model.rotary_emb.inv_freq" in expected
    assert "model.rotary_emb.inv_freq" not in model.state_dict()

    result = validate_model_device_consistency(model, "cpu")
    assert result["is_consistent"] is False
    assert {i["name"] for i in result["issues"]} == expected
    assert all(i["device"] == "meta" and not i["offloaded"] for i in result["issues"])
    kinds = {i["name"]: i["kind"] for i in result["issues"]}
    assert kinds["model.rotary_emb.inv_freq"] == "buffer"
    assert {kinds[n] for n in tensor_names(expert, name)} == {"parameter"}

    # Against "meta" the same model is inconsistent the other way round.
    on_meta = validate_model_device_consistency(model, "meta")
    all_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert {i["name"] for i in on_meta["issues"]} == all_names - expected


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_fix_moves_moe_blocks_only(arch):
    model = make_model(arch)
    name, expert = one_expert(model, layer=1)
    expert.to(torch.float16)  # a dtype that must survive the move
    params_before = dict(model.named_parameters())
    moe_names = moe_reference_names(model)

    assert fix_moe_device_issues(model, "meta") is model

    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in params_before.items()), "Parameter objects must be kept"
    for n, t in list(after.items()) + list(model.named_buffers()):
        assert t.device.type == ("meta" if n in moe_names else "cpu"), n
    assert {t.dtype for t in expert.parameters()} == {torch.float16}
    remaining = {i["name"] for i in validate_model_device_consistency(model, "meta")["issues"]}
    assert remaining == ({n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}) - moe_names

    # Already in place: nothing moves.
    assert move_moe_blocks(model, "meta").moved == []


def test_fix_leaves_hooked_modules_and_reports_them(caplog):
    model = make_model("qwen2_moe")
    name, expert = one_expert(model, layer=0)
    expert._hf_hook = object()  # as accelerate's add_hook_to_module leaves it
    model.model.layers[1]._hf_hook = object()  # an ancestor of layer 1's MoE block

    with caplog.at_level(logging.WARNING, logger="sglang.srt.enhanced.device_fix"):
        report = move_moe_blocks(model, "meta")

    assert report.skipped_offloaded == [name, "model.layers.1"]
    assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    held_back = tensor_names(expert, name) | tensor_names(model.model.layers[1], "model.layers.1")
    assert all(t.device.type == "cpu" for n, t in model.named_parameters() if n in held_back)
    assert set(report.moved) == moe_reference_names(model) - held_back
    issues = validate_model_device_consistency(model, "meta")["issues"]
    assert {i["name"] for i in issues if i["offloaded"]} == held_back


def test_meta_tensor_cannot_be_moved_to_a_real_device():
    model = make_model("mixtral")
    name, expert = one_expert(model)
    expert.to("meta")
    with pytest.raises(EnhancedError, match="meta device") as info:
        fix_moe_device_issues(model, "cpu")
    assert info.value.culprit in tensor_names(expert, name)


def test_tied_weights_stay_tied():
    model = make_model("qwen2_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = comprehensive_device_fix(model, None, "meta")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "meta"
    assert report["is_consistent"] and report["remaining_issues"] == []
    # Tied tensors are one tensor: reported once, under the first name.
    assert "model.embed_tokens.weight" in report["moved"] and "lm_head.weight" not in report["moved"]


def test_comprehensive_report_with_stray_and_hooked_modules():
    model = make_model("mixtral", pad_token_id=None)
    tok = make_tokenizer(with_pad=False)
    name, expert = one_expert(model, layer=1)
    expert._hf_hook = object()
    model.model.rotary_emb.to("meta")
    model.model.layers[0].to("meta")
    on_cpu = {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "cpu"}
    assert model.generation_config.pad_token_id is None

    report = comprehensive_device_fix(model, tok, "meta")

    hooked = tensor_names(expert, name)
    assert set(report["moved"]) == on_cpu - hooked
    assert report["skipped_offloaded"] == [name]
    assert {i["name"] for i in report["remaining_issues"]} == hooked
    assert all(i["offloaded"] and i["device"] == "cpu" for i in report["remaining_issues"])
    assert report["is_consistent"] is False
    assert report["pad_token_set"] is True and tok.pad_token_id == EOS == report["pad_token_id"]
    assert report["generation_pad_token_id_set"] is True and model.generation_config.pad_token_id == EOS


def test_comprehensive_then_generate_with_mask():
    model = make_model("qwen2_moe", vocab_size=64, eos_token_id=EOS, bos_token_id=None, pad_token_id=None)
    tok = make_tokenizer(with_pad=False, padding_side="left")
    report = comprehensive_device_fix(model, tok, "cpu")
    assert report["moved"] == [] and report["is_consistent"]
    assert report["pad_token_set"] and report["generation_pad_token_id_set"]
    assert model.generation_config.pad_token_id == tok.eos_token_id == tok.pad_token_id

    enc = tok(["w1 w2 </s> w3 w4", "w5 w6"], padding=True, return_tensors="pt")
    mask = create_proper_attention_mask(enc["input_ids"], tok, "cpu")
    assert torch.equal(mask, enc["attention_mask"])
    out = model.generate(enc["input_ids"], attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 3)


# --------------------------------------------------------------------------- attention masks


def test_mask_right_padding_pad_equals_eos():
    tok = make_tokenizer(padding_side="right")
    e = EOS
    ids = torch.tensor([
        [5, 6, 7, e, e, e],  # text "5 6 7": one trailing eos kept (could be the text's own)
        [5, e, 6, 7, e, e],  # genuine eos inside stays, first trailing one kept
        [5, 6, 7, 8, 9, 10],  # no padding
        [e, e, e, e, e, e],  # only pad ids: one position kept
        [5, 6, 7, 8, 9, e],  # ends in eos, no padding
    ])
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ])
    mask = create_proper_attention_mask(ids, tok, "cpu")
    assert mask.dtype == torch.long and mask.device.type == "cpu"
    assert torch.equal(mask, expected)
    assert torch.equal(create_proper_attention_mask(ids[1], tok, "cpu"), expected[1])
    # Exact lengths settle what ids alone cannot.
    exact = create_proper_attention_mask(ids, tok, "cpu", lengths=[3, 5, 6, 0, 6])
    assert torch.equal(exact, torch.tensor([[1] * n + [0] * (6 - n) for n in [3, 5, 6, 0, 6]]))


def test_mask_left_padding_pad_equals_eos():
    tok = make_tokenizer(padding_side="left")
    e = EOS
    ids = torch.tensor([
        [e, e, 5, e, 6, 7],  # genuine eos inside stays
        [5, 6, 7, 8, 9, e],  # real text ending in eos, no padding
        [e, e, e, e, e, e],
    ])
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(create_proper_attention_mask(ids, tok, "cpu"), expected)
    exact = create_proper_attention_mask(ids, tok, "cpu", lengths=torch.tensor([4, 6, 2]))
    assert torch.equal(exact, torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 1, 1]]))
    # A tokenizer that prepends a bos equal to the pad id keeps the last id of the leading run.
    tok.bos_token = tok.eos_token
    tok.add_bos_token = True
    assert torch.equal(create_proper_attention_mask(ids[:1], tok, "cpu"), torch.tensor([[0, 1, 1, 1, 1, 1]]))


def test_mask_against_the_tokenizers_own_mask():
    texts = ["w1 </s> w2 w3 w4", "w5", "w6 w7 w8"]
    tok = make_tokenizer(padding_side="left")
    enc = tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(create_proper_attention_mask(enc["input_ids"], tok, "cpu"), enc["attention_mask"])

    tok = make_tokenizer(padding_side="right")
    enc = tok(texts, padding=True, return_tensors="pt")
    ours = create_proper_attention_mask(enc["input_ids"], tok, "cpu")
    # Right padding keeps the first pad of each padded row (it could be the text's own eos).
    assert (ours - enc["attention_mask"]).tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]
    lengths = enc["attention_mask"].sum(-1)
    assert torch.equal(create_proper_attention_mask(enc["input_ids"], tok, "cpu", lengths), enc["attention_mask"])


def test_mask_pad_differs_from_eos():
    tok = make_tokenizer()
    tok.add_special_tokens({"pad_token": "<pad>"})
    pad = tok.pad_token_id
    assert pad != EOS
    ids = torch.tensor([[5, EOS, 6, pad, pad], [pad, pad, 5, 6, EOS]])
    assert torch.equal(create_proper_attention_mask(ids, tok, "cpu"), (ids != pad).long())
    no_pad = make_tokenizer(with_pad=False)
    assert torch.equal(create_proper_attention_mask(ids, no_pad, "cpu"), torch.ones_like(ids))


def test_mask_bad_input():
    tok = make_tokenizer()
    with pytest.raises(EnhancedError, match="lengths"):
        create_proper_attention_mask(torch.ones(2, 4, dtype=torch.long), tok, "cpu", lengths=[5, 1])
    with pytest.raises(EnhancedError, match="input_ids"):
        create_proper_attention_mask(torch.ones(1, 2, 3, dtype=torch.long), tok, "cpu")
    tok.padding_side = "middle"
    with pytest.raises(EnhancedError, match="padding_side"):
        create_proper_attention_mask(torch.ones(2, 4, dtype=torch.long), tok, "cpu")


@pytest.mark.parametrize("side", ["left", "right"])
def test_mask_gives_unpadded_logits(side):
    """Logits at real positions of a padded batch (pad == eos) equal those of each row run alone."""
    model = make_model("qwen2_moe", vocab_size=64)
    tok = make_tokenizer(padding_side=side)
    texts = ["w1 w2 </s> w3 w4 w5", "w6 </s> w7"]  # both hold a genuine eos
    enc = tok(texts, padding=True, return_tensors="pt")
    mask = create_proper_attention_mask(enc["input_ids"], tok, "cpu")
    naive = (enc["input_ids"] != tok.pad_token_id).long()
    assert not torch.equal(mask, naive)  # the naive mask drops the genuine eos tokens

    def logits(ids, attention_mask):
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attention_mask, position_ids=pos).logits

    batch = logits(enc["input_ids"], mask)
    for row, text in enumerate(texts):
        alone = tok(text, return_tensors="pt")["input_ids"]
        n = alone.shape[1]
        ref = logits(alone, torch.ones_like(alone))[0]
        if side == "left":
            assert int(mask[row].sum()) == n
            got = batch[row, -n:]
        else:  # a kept trailing pad cannot affect earlier positions
            assert bool(mask[row, :n].all())
            got = batch[row, :n]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- devices


BAD_DEVICES = ["gpu", "cuda:x", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_bad_device_is_named(device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    model = make_model("mixtral")
    tok = make_tokenizer()
    calls = [
        lambda: validate_model_device_consistency(model, device),
        lambda: fix_moe_device_issues(model, device),
        lambda: comprehensive_device_fix(model, tok, device),
        lambda: create_proper_attention_mask(torch.ones(1, 3, dtype=torch.long), tok, device),
    ]
    for call in calls:
        with pytest.raises(EnhancedError, match=re.escape(device)) as info:
            call()
        assert info.value.culprit == device
    assert all(t.device.type == "cpu" for t in model.parameters())


# --------------------------------------------------------------------------- docs


def test_readme_example_runs():
    readme = (REPO / "README_ENHANCED_FEATURES.md").read_text()
    section = readme.split("\n## Device problems\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python example in the README's Device problems section"
    namespace: dict = {"__name__": "__docs_example__"}
    exec(compile("\n".join(blocks), "README_ENHANCED_FEATURES.md", "exec"), namespace)  # noqa: S102
    assert namespace["validation"]["is_consistent"]
