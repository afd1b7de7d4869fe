"""Two decode-step kernels for the transformers engine on a CPU, where a decode step is memory-bound.

A decode step reads every sequence's KV cache and every weight, so its time is the memory it reads. With torch's
stock kernels two of its parts read far slower than the machine's memory allows:

- **attention over a one-token query**: torch's CPU flash-attention kernel is built for many query tokens; two
  batched matrix products over the key/value heads (the query heads of a group packed as rows, as transformers'
  own ``pack_gqa``) read the cache faster. Prompts (more than one query token) keep SDPA.
- **the LM head**: ``x @ W.T`` with the ``[vocab, hidden]`` weight streams the weights slowly; ``(W @ x.T).T`` is
  the same product in the layout the CPU BLAS streams best.

Both compute the same sums in another order, so logits agree to float rounding; the engine's tests hold the
greedy texts of the decode loop to ``generate``'s.
"""

from __future__ import annotations

import torch

NAME = "sdpa-cpu-decode"
"""The attention implementation registered with transformers (SDPA for prompts, :func:`_attention` for a step).
The name must contain "sdpa": transformers then refuses it for a model that does not support SDPA, as it should."""


def install(model) -> bool:
    """Switch ``model`` (on the CPU) to these kernels; False where the model does not take a custom attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        return _attention(query, key, value, attention_mask, scaling), None

    try:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, TypeError):
        return False
    if getattr(model.config, "_attn_implementation", None) != NAME:  # refused with a warning, not an error
        return False
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:  # not a quantized subclass, whose weight is packed
        head.forward = _lm_head(head)
    return True


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """Attention of one query token a row: ``query`` ``[batch, heads, 1, dim]``, ``key``/``value`` ``[batch,
    kv_heads, positions, dim]``, ``mask`` boolean (True: attend) or additive, broadcastable to ``[batch, 1, 1,
    positions]``. Returns ``[batch, 1, heads, dim]``, as transformers' attention functions do."""
    batch, heads, _, dim = query.shape
    groups = key.shape[1]
    q = query.reshape(batch, groups, heads // groups, dim)  # the query heads sharing a key/value head, as rows
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(dim**-0.5 if scaling is None else scaling)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)  # float32 sums, as SDPA's kernels
    out = torch.matmul(weights, value)  # [batch, groups, heads per group, value dim]
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2)


def _lm_head(head: torch.nn.Linear):
    """``head``'s forward as ``(W @ x.T).T``; its weight and bias are read at each call (re-tied or replaced
    weights are seen). The logits come back as a transposed view: fine for sampling, not for ``.view``."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        logits = torch.mm(head.weight, rows.t()).t()
        if head.bias is not None:
            logits = logits + head.bias
        return logits.reshape(*hidden.shape[:-1], head.weight.shape[0])

    return forward
