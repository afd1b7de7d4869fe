"""What keeps a damaged file of the profile store from spreading: every file a version commits (its profiles and
Persona-Plug item embeddings) has the sha256 of its bytes in the version's ``manifest.json`` (``checksums``).

- The next night reads its base version's files through :class:`VersionFiles`: a file whose bytes differ from the
  recorded checksum, or that does not parse, is not carried; its users are profiled again from their history, and
  the new version's manifest names the file (``damaged_base_files``, from the markers under ``base-damage/``).
- ``stepback promote`` verifies every file of the version it is asked to serve (:func:`verify_version`).
- ``stepback forget`` rewrites files of finished versions: it records the new file's checksum as pending before
  the write and as the checksum after it, so a forget killed in between leaves a version that still verifies.

A version written before checksums existed (no ``checksums`` in its manifest) is read as before: a file that does
not parse is still found, a bit flipped inside a value is not.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stepback_ray.errors import DamagedFile
from stepback_ray.storage import RunStore

CHECKSUMS = "checksums"
PENDING = "checksums_pending"
"""Checksums of files a forget is rewriting right now (the old and the new bytes both verify until it settles)."""
BASE_DAMAGE = "base-damage"
"""Folder of a version: one marker per file of its base version that was found damaged and not carried."""
FOLDERS = ("profiles", "embeddings")


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def version_files(root: RunStore, version: str) -> list[str]:
    """The Parquet files a version holds (profiles and embeddings), relative to the store's root."""
    return [rel for folder in FOLDERS for rel in root.list(f"{version}/{folder}", ".parquet")]


def checksums_of(root: RunStore, files: list[str]) -> dict[str, str]:
    """Each file's checksum, read back from storage (a few files at a time: object storage answers in parallel)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(files, pool.map(lambda rel: checksum(root.read_bytes(rel)), files)))


def parse(root: RunStore, rel: str, data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's rows, or :class:`DamagedFile` naming it when its bytes do not parse."""
    try:
        return pq.read_table(io.BytesIO(data), columns=columns)
    except (pa.ArrowException, OSError) as e:  # the bytes are here: what fails is their content
        raise DamagedFile(root.uri_of(rel), f"not a readable Parquet file ({str(e).splitlines()[0]})") from None


class VersionFiles:
    """The files of one finished version, checked against the checksums its manifest records (none recorded: a
    version written before checksums, whose files are only parsed)."""

    def __init__(self, root: RunStore, version: str):
        self.root, self.version = root, version
        self.manifest: dict[str, Any] | None = None
        self._rewritten: set[str] = set()
        self._load()

    def _load(self) -> None:
        rel = f"{self.version}/manifest.json"
        self.manifest = self.root.read_json(rel) if self.root.exists(rel) else None

    @property
    def checked(self) -> bool:
        return bool(self.manifest and CHECKSUMS in self.manifest)

    def recorded(self, rel: str) -> set[str]:
        """The checksums ``rel`` may have: the one committed, and one a forget is writing (empty: none recorded)."""
        m = self.manifest or {}
        return {s for s in ((m.get(CHECKSUMS) or {}).get(rel), (m.get(PENDING) or {}).get(rel)) if s}

    def problem(self, rel: str, data: bytes) -> str | None:
        """What is wrong with ``data`` as the bytes of ``rel`` (None: they are what the version committed)."""
        accepted = self.recorded(rel) if self.checked else None
        now = checksum(data)
        if not accepted or now in accepted:  # (a file without a recorded checksum is only parsed, as before them)
            return None
        self._load()  # a forget may have rewritten the file since the manifest was read
        accepted = self.recorded(rel)
        if not accepted or now in accepted:
            return None
        was = min(accepted)[7:19]
        return f"its sha256 differs from the one recorded when it was committed ({now[7:19]}... now, {was}...)"

    def read(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """The file's rows; :class:`DamagedFile` when its checksum differs or it does not parse."""
        data = self.root.read_bytes(rel)
        problem = self.problem(rel, data)
        if problem:
            raise DamagedFile(self.root.uri_of(rel), problem)
        return parse(self.root, rel, data, columns)

    # -------------------------------------------------------------------------- a forget rewriting a file
    def expect(self, rel: str, table: pa.Table) -> None:
        """Before ``rel`` is rewritten with ``table`` (:meth:`RunStore.write_table`, which writes a table to the
        same bytes every time): their checksum recorded as pending (nothing without checksums)."""
        if self.checked:
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")  # as RunStore.write_table
            self.manifest.setdefault(PENDING, {})[rel] = checksum(buf.getvalue())
            self.root.write_json(f"{self.version}/manifest.json", self.manifest)
            self._rewritten.add(rel)

    def settle(self) -> None:
        """After the rewrites: each file that holds its pending checksum's bytes (or that this forget has just
        rewritten) gets that checksum; pending entries of a forget killed before its write are dropped."""
        if not self.checked or not self.manifest.get(PENDING):
            return
        for rel, value in self.manifest.pop(PENDING).items():
            now = checksum(self.root.read_bytes(rel)) if self.root.exists(rel) else None
            if now is not None and (now == value or rel in self._rewritten):
                self.manifest[CHECKSUMS][rel] = now
        self.root.write_json(f"{self.version}/manifest.json", self.manifest)


MISSING = "missing (its version's manifest names it, the store does not hold it)"


def check_files(root: RunStore, version: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file of a finished version, checked: those its manifest names (``files``, ``checksums``) against the
    checksum recorded for them, or parsed where none is; a named file that is gone is :data:`MISSING`; a Parquet
    file in the version's folders that the manifest does not name is parsed, and reported as such (no part of the
    version as committed, but what a reader that goes by file names would read). Per file: ``file`` (relative to
    the root), ``check`` (``sha256``, or ``parsed``: no checksum to compare with), ``named``, ``problem`` (None: it
    is what was committed, or at least readable)."""
    files = VersionFiles(root, version)
    named = set(manifest.get("files") or []) | set(manifest.get(CHECKSUMS) or {})
    found = []
    for rel in sorted(named | set(version_files(root, version))):
        check = {"file": rel, "check": "sha256" if files.recorded(rel) else "parsed", "named": rel in named}
        try:
            data = root.read_bytes(rel)
        except FileNotFoundError:
            found.append({**check, "problem": MISSING})
            continue
        problem = files.problem(rel, data)
        if problem is None and not files.recorded(rel):
            try:
                parse(root, rel, data)
            except DamagedFile as e:
                problem = e.problem
        found.append({**check, "problem": problem})
    return found


def verify_version(root: RunStore, version: str, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(file URI, problem) for each damaged file a finished version's manifest names (:func:`check_files`); a named
    file that is gone is left to the caller (``stepback promote`` names it as missing)."""
    return [
        (root.uri_of(c["file"]), c["problem"])
        for c in check_files(root, version, manifest)
        if c["named"] and c["problem"] and c["problem"] != MISSING
    ]


# ------------------------------------------------------------------------------ a damaged base, recorded
def note_base_damage(root: RunStore, version: str | None, damaged: DamagedFile, rel: str) -> None:
    """Record in ``version`` (the one being built) that its base version's ``rel`` was damaged and not carried."""
    if version:
        name = rel.replace("/", "~")
        root.write_json(f"{version}/{BASE_DAMAGE}/{name}.json", {"file": damaged.uri, "problem": damaged.problem})


def base_damage(root: RunStore, version: str) -> list[dict[str, str]]:
    """The damaged base files the version's passes met (:func:`note_base_damage`), by file."""
    found = [root.read_json(rel) for rel in root.list(f"{version}/{BASE_DAMAGE}", ".json")]
    return sorted(found, key=lambda d: d["file"])
