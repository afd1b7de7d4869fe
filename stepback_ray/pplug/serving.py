"""Persona-Plug in the batch pipeline: item embeddings precomputed per user, soft tokens per query.

The embedding pass encodes every history item once per run (or, with a profile store, only items the previous
store version has not embedded) and stores the vectors with the user, by shard. The generation pass then needs
only the query's embedding and the trained plug to give each query its two soft tokens, which travel with the
row to the engine stage and are placed before the prompt's token embeddings.
"""

from __future__ import annotations

import numpy as np

from stepback_ray.config import JobSpec
from stepback_ray.errors import StepbackError
from stepback_ray.pplug.encoder import TextEncoder
from stepback_ray.pplug.training import load_checkpoint
from stepback_ray.tasks import get_task


class PlugServer:
    """The trained plug and its encoder, loaded once per CPU actor."""

    def __init__(self, job: JobSpec):
        import torch

        self.torch = torch
        self.plug, self.meta = load_checkpoint(job.pplug.checkpoint, job.storage)
        if self.meta["model"] != job.engine.model:
            raise StepbackError(
                f"pplug.checkpoint was trained for model {self.meta['model']!r}; the job uses "
                f"{job.engine.model!r} (soft tokens live in one model's embedding space)"
            )
        self.encoder = TextEncoder(self.meta["encoder"], max_seq_length=self.meta["encoder_max_tokens"])
        self.task = get_task(job.task)
        self.max_items = self.meta.get("max_items", job.pplug.max_items)

    def soft_tokens(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray | None]:
        """For each (query input, item vectors [n, d_enc]) the soft tokens [2, d_llm]; None without history."""
        torch = self.torch
        out: list[np.ndarray | None] = [None] * len(requests)
        todo = [i for i, (_, vecs) in enumerate(requests) if len(vecs)]
        if not todo:
            return out
        qvecs = self.encoder.encode([self.task.query_text(requests[i][0]) for i in todo])
        n_max = max(len(requests[i][1]) for i in todo)
        items = torch.zeros(len(todo), n_max, self.encoder.dim)
        mask = torch.zeros(len(todo), n_max, dtype=torch.bool)
        for row, i in enumerate(todo):
            vecs = requests[i][1]
            items[row, : len(vecs)] = torch.from_numpy(np.asarray(vecs, dtype=np.float32))
            mask[row, : len(vecs)] = True
        with torch.no_grad():
            soft = self.plug(torch.from_numpy(qvecs), items, mask).numpy()
        for row, i in enumerate(todo):
            out[i] = soft[row]
        return out
