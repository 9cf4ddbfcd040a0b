"""Expert choices of a transformers forward pass: the reference for served expert counts.

The model is loaded in float32 from the served checkpoint; each MoE layer's top-k comes from its
router's output (softmax, then top-k, as the model does), outside any code of ours.
"""

from __future__ import annotations

from pathlib import Path

import torch


class RouterReference:
    """Per MoE layer, the experts each token of a sequence picks in a transformers forward."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        config = self.model.config
        self.top_k = config.num_experts_per_tok
        self.num_experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None) \
            or config.num_local_experts
        self.moe_layers: list[int] = []
        self._captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.model.layers):
            block = getattr(layer, "block_sparse_moe", None) or getattr(layer, "mlp", None)
            gate = getattr(block, "gate", None) if hasattr(block, "experts") else None
            if gate is not None:
                self.moe_layers.append(i)
                gate.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):  # noqa: ANN202
        def hook(_module, _args, out) -> None:  # noqa: ANN001
            if isinstance(out, tuple):  # DeepSeek-V3's router returns (topk_ids, topk_weights)
                self._captured[layer] = out[0].reshape(-1, self.top_k)
            else:  # router logits: the model takes softmax then top-k
                self._captured[layer] = torch.topk(torch.softmax(out.float(), dim=-1), self.top_k, dim=-1).indices

        return hook

    def choices(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """``{layer: [len(ids), top_k]}`` expert ids of one sequence."""
        self._captured.clear()
        with torch.no_grad():
            self.model(torch.tensor([ids]))
        return {layer: t.reshape(len(ids), self.top_k) for layer, t in self._captured.items()}

    def tokens(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """``{layer: [num_experts]}`` tokens per expert of one sequence."""
        return {layer: torch.bincount(t.reshape(-1), minlength=self.num_experts)
                for layer, t in self.choices(ids).items()}
