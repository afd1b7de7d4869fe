"""The frozen text encoder of Persona-Plug: history items and queries as unit vectors.

Item text follows the PPlug code's per-task formats (the raw LaMP fields, no labels: LaMP_5 title + abstract,
LaMP_4 text + title, ...); the query is the part of the input the official LaMP retrieval uses.
"""

from __future__ import annotations

import numpy as np

from stepback_ray.engines.models import resolve_model
from stepback_ray.tasks import Item, TaskSpec


def item_text(task: TaskSpec, item: Item) -> str:
    """The text of ``item`` the encoder embeds (the task declares it: ``TaskSpec.plug_item``)."""
    return task.plug_item(item)


class TextEncoder:
    """A sentence-transformers model (default: the packaged all-MiniLM-L6-v2), normalized embeddings."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64, max_seq_length: int = 256):
        from sentence_transformers import SentenceTransformer  # deferred: imports torch

        self.model = SentenceTransformer(resolve_model(model), device=device)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(
            self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ),
            dtype=np.float32,
        )
