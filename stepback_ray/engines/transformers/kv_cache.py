"""KV caches for the transformers engine's split prefill: prompts prefilled apart, their caches stitched into one.

Each prefilled group's keys and values are written once, right-aligned, into per-layer buffers as wide as the decode
batch's longest prompt plus room for the tokens still to come; a decode step then writes its keys and values in place
instead of copying the whole cache (``DynamicLayer`` grows by ``torch.cat``: with a large decode batch that copy is
most of a decode step's memory traffic). Needs transformers 5's layered caches: importing this module
fails on older versions, and the engine then keeps its one-call path.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def full_attention(model_config) -> bool:
    """Whether every layer of this model keeps a plain growing cache (no sliding window, no hybrid layers):
    only such caches can be stitched from parts."""
    layers = DynamicCache(config=model_config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def layers_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)``, ``[batch, kv_heads, positions, head_dim]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def stitched(model_config, buffers: list[tuple[torch.Tensor, torch.Tensor]], filled: int) -> DynamicCache:
    """A cache over per-layer ``(keys, values)`` buffers, ``[batch, kv_heads, capacity, head_dim]``, whose first
    ``filled`` positions hold the prompts; the rest is room for the tokens to come (no copy is made)."""
    cache = DynamicCache(config=model_config)
    cache.layers = [_LayerWithRoom(k, v, filled) for k, v in buffers]
    return cache


class _LayerWithRoom(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers with room to grow: ``update`` writes into them
    and hands out views of the filled part (beyond the room it grows by concatenation, as its parent does)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int):
        super().__init__()
        self._keys, self._values, self._filled = keys, values, filled
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self._filled, self._filled + key_states.shape[-2]
        if self.keys.data_ptr() != self._keys.data_ptr() or end > self._keys.shape[-2]:
            return super().update(key_states, value_states)  # out of room (or already grown past it)
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._filled = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values
