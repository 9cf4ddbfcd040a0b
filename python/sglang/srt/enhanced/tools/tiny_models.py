"""Tiny, deterministic Mixture-of-Experts checkpoints for demos and tests.

Each model has 2 decoder layers, hidden size 64 and 4 experts, random weights
from a fixed seed, and a byte-level BPE tokenizer trained locally (no hub access).

    python -m sglang.srt.enhanced.tools.tiny_models --arch qwen2_moe --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from sglang.srt.enhanced.errors import EnhancedError

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# What the tokenizer returns: decoder-only models take no token_type_ids (generate() refuses them).
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route each token "
    "to a few experts. Attention layers mix information across tokens, and feed forward layers "
    "transform each token. Hello world! How are you today? I am fine, thank you. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Weights can be stored in bfloat16, float8 or int4. "
    "User: write a short poem about the sea. Assistant: The sea is wide and blue and deep. "
)


def _common(arch_defaults: dict, overrides: dict) -> dict:
    """Shared tiny sizes, then the architecture's own keys, then the caller's overrides."""
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-6,
    )
    base.update(arch_defaults)
    base.update(overrides)
    return base


def _qwen2_moe(**kw: object):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_common(dict(
        intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False), kw))


def _qwen3_moe(**kw: object):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_common(dict(
        head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True), kw))


def _mixtral(**kw: object):
    from transformers import MixtralConfig

    return MixtralConfig(**_common(dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2), kw))


def _olmoe(**kw: object):
    from transformers import OlmoeConfig

    return OlmoeConfig(**_common(dict(
        num_key_value_heads=4, intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False), kw))


def _deepseek_v3(**kw: object):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**_common(dict(
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, first_k_dense_replace=1,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_scaling=None,
        topk_method="noaux_tc", moe_layer_freq=1), kw))


ARCHS: dict[str, Callable[..., object]] = {
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}


def tiny_config(arch: str, **overrides: object):
    """Return the transformers config of the tiny model of architecture ``arch``."""
    try:
        make = ARCHS[arch]
    except KeyError:
        raise EnhancedError(f"unknown tiny architecture; valid: {sorted(ARCHS)}", culprit=arch) from None
    return make(**overrides)


def train_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on a built-in corpus and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[0], unk_token=None, model_input_names=list(MODEL_INPUT_NAMES),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_tiny_model(
    arch: str, out_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides: object
) -> Path:
    """Write a tiny random ``arch`` checkpoint (safetensors + tokenizer) to ``out_dir``; return it."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out_dir)
    config = tiny_config(arch, **overrides)
    config.torch_dtype = dtype
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        # Larger router weights spread tokens over the experts more than the default init.
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                param.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
    _drop_auto_map(out_dir / "config.json")
    return out_dir


def _drop_auto_map(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen2_moe")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    build_tiny_model(args.arch, args.out, seed=args.seed, dtype=getattr(torch, args.dtype))
    print(args.out)


if __name__ == "__main__":
    main()
