"""The device's on-disk store: bundles by hash and one state file per model.

Layout under the state directory::

    bundles/<sha256>.edge            verified bundles (staged, active, previous)
    downloads/<sha256>.part|.record.json
    models/<model>.json              ModelState, written atomically
    tuf/                             trusted metadata (agent.trust)

Every write goes through a temp file, fsync, ``os.replace`` and a directory
fsync, so a power cut leaves either the old file or the new one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import safejson
from agent.errors import JsonError
from agent.fsutil import fsync_dir, write_atomic
from agent.manifest import check_name

log = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class Held:
    """A bundle the device holds for a model."""

    version: str
    sha256: str
    at: str


@dataclass(frozen=True, kw_only=True)
class ModelState:
    name: str
    staged: Held | None = None
    seen: dict[str, str] = field(default_factory=dict)
    """version -> sha256 of every release this device accepted."""
    refused: dict[str, str] = field(default_factory=dict)
    """sha256 -> reason, for releases refused as bad data (not retried until the repository changes them)."""
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, obj: Any) -> ModelState:
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise JsonError("model state: not a format-1 state file")

        def held(v: Any) -> Held | None:
            return None if v is None else Held(version=str(v["version"]), sha256=str(v["sha256"]), at=str(v["at"]))

        return cls(name=check_name(obj["name"]), staged=held(obj.get("staged")),
                   seen={str(k): str(v) for k, v in obj.get("seen", {}).items()},
                   refused={str(k): str(v) for k, v in obj.get("refused", {}).items()},
                   last_error=obj.get("last_error"))


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.downloads = root / "downloads"
        self.models = root / "models"
        for d in (self.bundles, self.downloads, self.models):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.models.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def bundle_path(self, sha256: str) -> Path:
        return self.bundles / f"{sha256}.edge"

    def load(self, model: str) -> ModelState:
        path = self.models / f"{check_name(model)}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return ModelState(name=model)
        return ModelState.from_dict(safejson.loads(data, max_bytes=1 << 20, max_depth=8))

    def save(self, state: ModelState) -> None:
        write_atomic(self.models / f"{state.name}.json", safejson.dumps(state.to_dict()))

    def stage(self, state: ModelState, *, version: str, sha256: str, verified_file: Path) -> ModelState:
        """Move a verified download into ``bundles/`` and record it as staged."""
        dest = self.bundle_path(sha256)
        os.replace(verified_file, dest)
        fsync_dir(self.bundles)
        old = state.staged
        new = replace(state, staged=Held(version=version, sha256=sha256, at=now_iso()),
                      seen={**state.seen, version: sha256}, last_error=None)
        self.save(new)
        if old is not None and old.sha256 != sha256:
            self.bundle_path(old.sha256).unlink(missing_ok=True)
        log.info("%s %s verified and staged (%s)", state.name, version, sha256[:12])
        return new

    def refuse(self, state: ModelState, sha256: str, reason: str) -> ModelState:
        new = replace(state, refused={**state.refused, sha256: reason[:300]}, last_error=reason[:300])
        self.save(new)
        return new

    def note_error(self, state: ModelState, reason: str | None) -> ModelState:
        if state.last_error == reason:
            return state
        new = replace(state, last_error=None if reason is None else reason[:300])
        self.save(new)
        return new
