"""The proxy prompt in SAM 2's memory attention (paper Sec. 3.3): P becomes memory tokens that every frame attends to.

SAM 2's memory attention applies rotary position encoding (RoPE) to its memory keys, repeating the frame's 2D
frequencies over them: the spatial memory tokens must be a whole multiple of a frame's tokens. P's T tokens are not a
frame, so they go after the spatial memories and the object pointers and are counted with the object pointers among
the keys RoPE leaves out (``num_obj_ptr_tokens``), as SAM 2 itself does for object pointers. Their position is a
learned embedding instead (zero at init), like the temporal encodings SAM 2 adds to its memories.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class MemoryPrompt(nn.Module):
    """P (B, T, C) -> memory tokens (T, B, M) and their positional embedding (T, B, M), M = SAM 2's memory width."""

    def __init__(self, prompt_dim: int, memory_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(prompt_dim, memory_dim)
        self.pos = nn.Parameter(torch.zeros(1, 1, memory_dim))

    def forward(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.proj(prompt).transpose(0, 1)  # (B, T, C) -> (T, B, M), SAM 2's sequence-first layout
        return tokens, self.pos.expand_as(tokens)


class PromptedMemoryAttention(nn.Module):
    """sam2's own ``MemoryAttention`` with the tokens given to `prompting` appended to its memory, outside RoPE."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self._prompt: tuple[Tensor, Tensor] | None = None

    @contextmanager
    def prompting(self, prompt: tuple[Tensor, Tensor] | None) -> Iterator[None]:
        """Within the block, every memory attention call sees ``prompt`` = (tokens, pos), each (T, B, M)."""
        self._prompt = prompt
        try:
            yield
        finally:
            self._prompt = None

    def forward(
        self,
        curr: Tensor | list[Tensor],
        memory: Tensor,
        curr_pos: Tensor | list[Tensor] | None = None,
        memory_pos: Tensor | None = None,
        num_obj_ptr_tokens: int = 0,
    ) -> Tensor:
        if self._prompt is not None:
            tokens, pos = self._prompt
            if tokens.shape[1] != memory.shape[1] or tokens.shape[2] != memory.shape[2]:
                raise ValueError(
                    f"prompt tokens {tuple(tokens.shape)} do not fit memory {tuple(memory.shape)} (L, B, M)"
                )
            memory = torch.cat([memory, tokens])  # (L, B, M) + (T, B, M)
            memory_pos = torch.cat([memory_pos, pos])
            num_obj_ptr_tokens += tokens.shape[0]
        return self.attention(
            curr=curr, memory=memory, curr_pos=curr_pos, memory_pos=memory_pos, num_obj_ptr_tokens=num_obj_ptr_tokens
        )
