"""The trainable part of Persona-Plug: input-aware aggregation and the two projectors.

    w_i = softmax_i(q . h_i)              q: the query's embedding, h_i: the user's item embeddings (unit vectors)
    P   = sum_i w_i Proj(h_i)             Proj: Linear(d_enc, d_llm) -> GELU -> Linear(d_llm, d_llm)
    I   = InstProj(e)                     e: a trained vector; InstProj has the same shape as Proj

The LLM input is [I; P; embeddings of the prompt]. The paper's code rescales the soft tokens by fixed constants
fitted to FlanT5; here both are rescaled to the mean norm of the target LLM's own token embeddings, so they live
at the scale the LLM expects whatever model is plugged in.
"""

from __future__ import annotations

import torch
from torch import nn


def projector(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class PersonaPlug(nn.Module):
    def __init__(self, d_enc: int, d_llm: int, target_norm: float):
        super().__init__()
        self.d_enc, self.d_llm = d_enc, d_llm
        self.proj = projector(d_enc, d_llm)
        self.inst_proj = projector(d_enc, d_llm)
        self.instruction = nn.Parameter(torch.rand(d_enc))
        self.register_buffer("target_norm", torch.tensor(float(target_norm)))

    def weights(self, query: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of each query over its user's items: [B, N], rows sum to 1 over the real items."""
        scores = torch.einsum("bd,bnd->bn", query, items)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.target_norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))

    def forward(self, query: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft tokens [B, 2, d_llm]: the instruction token, then the persona token."""
        w = self.weights(query, items, mask)
        persona = torch.einsum("bn,bnd->bd", w, self.proj(items))
        inst = self.inst_proj(self.instruction).expand(query.shape[0], -1)
        return torch.stack([self._scale(inst), self._scale(persona)], dim=1)

    def config(self) -> dict:
        return {"d_enc": self.d_enc, "d_llm": self.d_llm, "target_norm": float(self.target_norm)}
