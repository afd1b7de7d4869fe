"""The embedding pass (Persona-Plug): every history item of a chunk's users embedded once by the frozen sentence
encoder, stored beside the profiles (``embeddings/chunk-<id>.parquet``, same shards). Items the previous store
version already embedded (same id, same encoder) are reused, not re-encoded.
"""

from __future__ import annotations

import pyarrow as pa

from stepback_ray.config import JobSpec
from stepback_ray.errors import DamagedFile
from stepback_ray.generation import prompting
from stepback_ray.pipeline.chunks import ProfilesAt, chunk_users
from stepback_ray.pipeline.commit import commit_chunks
from stepback_ray.pipeline.schemas import EMBEDDING_SCHEMA, table, with_chunk_rows
from stepback_ray.pipeline.stages import Command, PassSpec, Stage
from stepback_ray.storage import RunStore
from stepback_ray.store.integrity import VersionFiles, note_base_damage
from stepback_ray.tasks import get_task


class EmbedStage:
    """CPU stage (Persona-Plug): every history item of a chunk's users embedded once; items the previous store
    version already embedded (same id, same encoder) are reused, not re-encoded."""

    def __init__(self, job: JobSpec, at: ProfilesAt):
        # deferred: the encoder and the checkpoint import torch
        from stepback_ray.pplug.encoder import TextEncoder, item_text
        from stepback_ray.pplug.training import checkpoint_config

        self.job, self.task, self.at = job, get_task(job.task), at
        # items are embedded as the plug being served was trained: its encoder, its text length
        spec = (
            checkpoint_config(job.pplug.checkpoint, job.storage)
            if job.pplug.checkpoint
            else {"encoder": job.pplug.encoder, "encoder_max_tokens": job.pplug.encoder_max_tokens}
        )
        self.encoder_name = f"{spec['encoder']}@{spec['encoder_max_tokens']}"
        self.encoder = TextEncoder(spec["encoder"], max_seq_length=spec["encoder_max_tokens"])
        self.item_text = item_text
        self.store = RunStore(at.uri, job.storage)
        self.base = VersionFiles(self.store, at.previous.rsplit("/", 1)[0]) if at.previous else None

    def _previous(self, chunk_id: str) -> dict[str, list[float]]:
        """The base version's vectors of the chunk's items; none from a damaged file (its items are encoded again,
        and the version's manifest names the file)."""
        rel = f"{self.at.previous_embeddings}/chunk-{chunk_id}.parquet" if self.at.previous_embeddings else None
        if rel is None or self.base is None or not self.store.exists(rel):
            return {}
        try:
            rows = self.base.read(rel).to_pylist()
        except DamagedFile as e:
            note_base_damage(self.store, self.at.version, e, rel)
            return {}
        known: dict[str, list[float]] = {}
        for r in rows:
            if r["encoder"] == self.encoder_name:
                known.update(zip(r["item_ids"], r["vectors"]))
        return known

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            users = chunk_users(self.job, chunk)
            known = self._previous(chunk["chunk_id"])
            todo = [it for u in users for it in u.history if it["id"] not in known]
            fresh = dict(
                zip([it["id"] for it in todo], self.encoder.encode([self.item_text(self.task, it) for it in todo]))
            )
            for u in users:
                ids = [it["id"] for it in u.history]
                rows.append(
                    {
                        "chunk_id": chunk["chunk_id"],
                        "chunk_rows": len(users),
                        "user_id": u.user_id,
                        "item_ids": ids,
                        "encoder": self.encoder_name,
                        "vectors": [list(map(float, known[i] if i in known else fresh[i])) for i in ids],
                        "reused": sum(1 for i in ids if i in known),
                    }
                )
        return table(rows, with_chunk_rows(EMBEDDING_SCHEMA))


def commit_embeddings(batch: pa.Table, job: JobSpec, at: ProfilesAt) -> pa.Table:
    """Commit stage: each chunk's embeddings as one file."""
    return pa.Table.from_pylist(commit_chunks(job, at.embeddings, batch.to_pylist(), EMBEDDING_SCHEMA, at.uri))


def needs_embeddings(job: JobSpec, command: Command = "run") -> bool:
    """Where one of the job's modes puts a Persona-Plug soft token before its prompt (both commands)."""
    return any(prompting.uses_plug(m) for m in job.modes)


EMBEDDING_PASS = PassSpec(
    "embedding",
    (
        # the sentence encoder runs here: a whole CPU
        Stage("embed", EmbedStage, "cpu", num_cpus=1.0),
        Stage("commit_embeddings", commit_embeddings, "commit"),
    ),
    over="users",
    commits_to=lambda job, at: (at.uri, at.embeddings),
    needed=needs_embeddings,
)
