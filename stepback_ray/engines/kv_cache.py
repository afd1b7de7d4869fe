"""KV caches for the transformers engine's split prefill: prompts prefilled apart, their caches stitched into one.

A prefilled group's cache is read layer by layer, left-padded to the decode batch's width and concatenated along the
batch; the stitched cache keeps room for the tokens still to come, so a decode step writes its keys and values in
place instead of copying the whole cache (``DynamicLayer`` grows by ``torch.cat``: at 64 sequences of ~350 tokens
that copy is most of a decode step's memory traffic). Needs transformers 5's layered caches: importing this module
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


def stitched(model_config, layers: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> DynamicCache:
    """A cache holding ``layers`` with space for ``room`` more positions per layer."""
    cache = DynamicCache(config=model_config)
    cache.layers = [_LayerWithRoom(k, v, room) for k, v in layers]
    return cache


class _LayerWithRoom(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with room to grow: ``update`` writes into it
    and hands out views of the filled part (beyond the room it grows by concatenation, as its parent does)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        b, h, n, _ = keys.shape
        self._keys = keys.new_empty((b, h, n + room, keys.shape[-1]))
        self._values = values.new_empty((b, h, n + room, values.shape[-1]))
        self._keys[:, :, :n] = keys
        self._values[:, :, :n] = values
        self._filled = n
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self._filled, self._filled + key_states.shape[-2]
        if self.keys.data_ptr() != self._keys.data_ptr() or end > self._keys.shape[-2]:
            return super().update(key_states, value_states)  # out of room (or already grown past it)
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._filled = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values
