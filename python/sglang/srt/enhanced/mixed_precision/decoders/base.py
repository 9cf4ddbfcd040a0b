"""What a checkpoint format must provide to the loader: name mapping and decoding.

A *logical* weight name is the name the unquantized model uses
(``model.layers.0.mlp.experts.3.down_proj.weight``). A *stored* name is a tensor
in the checkpoint files (``...down_proj.qweight``, ``...down_proj.weight_scale_inv``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch


class WeightDecoder(Protocol):
    """Turns the stored tensors of one checkpoint format into float weights."""

    format_name: str

    def logical_names(self, stored_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Map every logical weight name to the stored names it is decoded from."""
        ...

    def decode(
        self,
        logical_name: str,
        parts: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Decode one logical weight from its stored ``parts`` (all on one device).

        Returns a tensor on the parts' device in ``dtype`` ([out, in] for linear
        weights). Raises ``EnhancedError`` naming ``logical_name`` on bad shapes.
        """
        ...

    def decoded_nbytes(self, logical_name: str, part_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
        """Bytes the decoded weight takes in ``dtype``, computed from shapes alone."""
        ...
