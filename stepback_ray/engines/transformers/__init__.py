"""The Hugging Face transformers engine (``engine.kind: transformers``): the CPU default and the reference
implementation. :mod:`.engine` batches, prefills and decodes; :mod:`.kv_cache` stitches the split prefill's caches
into one decode batch's."""

from __future__ import annotations

from stepback_ray.engines.transformers.engine import TransformersEngine

__all__ = ["TransformersEngine"]
