"""The device's on-disk store: bundles and releases by hash, one state file per model.

Layout under the state directory::

    bundles/<sha256>.edge            verified bundles waiting to be installed (staged)
    releases/<sha256>/               installed releases: extracted, verified, self-tested
    downloads/<sha256>.part|.record.json
    models/<model>.json              ModelState: the pointer to what serves, written atomically
    tuf/                             trusted metadata (agent.trust)

**The switch is one ``os.replace`` of ``models/<model>.json``.** A release
directory is complete and fsynced before any state file names it, so a power
cut at any moment leaves the device on the old model or on the new one, never
on a mix; :meth:`Store.recover` removes whatever a cut left half-made.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from agent import failpoint, safejson
from agent.errors import JsonError
from agent.fsutil import fsync_dir, write_atomic
from agent.manifest import check_name

log = logging.getLogger(__name__)

STATE_FORMAT = 1
Status = Literal["none", "active", "watching", "rolled_back", "failed"]


@dataclass(frozen=True, kw_only=True)
class Held:
    """A release the device holds for a model."""

    version: str
    sha256: str
    at: str


@dataclass(frozen=True, kw_only=True)
class Watch:
    """The new release is on probation: ``inferences`` calls or ``seconds`` without a fault commit it."""

    sha256: str
    started: str
    inferences: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ModelState:
    name: str
    active: Held | None = None
    previous: Held | None = None
    staged: Held | None = None
    watch: Watch | None = None
    seen: dict[str, str] = field(default_factory=dict)
    """version -> sha256 of every release this device accepted."""
    refused: dict[str, str] = field(default_factory=dict)
    """sha256 -> reason, for releases refused (bad data, failed self-test, rolled back): not retried
    until the repository publishes something else."""
    last_error: str | None = None
    outcome: Literal["ok", "failed", "rolled_back"] = "ok"
    """How the last release went: ``failed`` (refused before the switch: the old model serves on),
    ``rolled_back`` (it misbehaved in its watch window: the previous model serves again)."""

    @property
    def status(self) -> Status:
        if self.watch is not None:
            return "watching"
        if self.outcome != "ok":
            return self.outcome
        return "none" if self.active is None else "active"

    @property
    def current(self) -> Held | None:
        """The newest release the device holds: staged (waiting to install), else active."""
        return self.staged or self.active

    def held(self) -> tuple[str, str] | None:
        """(version, sha256) of :attr:`current`."""
        h = self.current
        return None if h is None else (h.version, h.sha256)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, obj: Any) -> ModelState:
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise JsonError("model state: not a format-1 state file")

        def held(v: Any) -> Held | None:
            return None if v is None else Held(version=str(v["version"]), sha256=str(v["sha256"]), at=str(v["at"]))

        w = obj.get("watch")
        watch = None if w is None else Watch(sha256=str(w["sha256"]), started=str(w["started"]),
                                            inferences=int(w["inferences"]), seconds=float(w["seconds"]))
        return cls(name=check_name(obj["name"]), active=held(obj.get("active")), previous=held(obj.get("previous")),
                   staged=held(obj.get("staged")), watch=watch,
                   seen={str(k): str(v) for k, v in obj.get("seen", {}).items()},
                   refused={str(k): str(v) for k, v in obj.get("refused", {}).items()},
                   last_error=obj.get("last_error"), outcome=_outcome(obj.get("outcome", "ok")))


def _outcome(v: Any) -> Literal["ok", "failed", "rolled_back"]:
    if v not in ("ok", "failed", "rolled_back"):
        raise JsonError(f"model state: unknown outcome {v!r}")
    return v  # type: ignore[no-any-return]


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.releases = root / "releases"
        self.downloads = root / "downloads"
        self.models = root / "models"
        for d in (self.bundles, self.releases, self.downloads, self.models):
            d.mkdir(parents=True, exist_ok=True)

    def bundle_path(self, sha256: str) -> Path:
        return self.bundles / f"{sha256}.edge"

    def release_dir(self, sha256: str) -> Path:
        return self.releases / sha256

    def model_names(self) -> list[str]:
        return sorted(p.stem for p in self.models.glob("*.json") if not p.name.startswith("."))

    def load(self, model: str) -> ModelState:
        path = self.models / f"{check_name(model)}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return ModelState(name=model)
        return ModelState.from_dict(safejson.loads(data, max_bytes=1 << 20, max_depth=8))

    def save(self, state: ModelState) -> None:
        write_atomic(self.models / f"{state.name}.json", safejson.dumps(state.to_dict()))

    # --- recovery ---------------------------------------------------------

    def recover(self) -> list[str]:
        """Remove what an interrupted step left behind; return what was removed (for the log)."""
        removed: list[str] = []
        keep_bundles: set[str] = set()
        keep_releases: set[str] = set()
        for name in self.model_names():
            st = self.load(name)
            if st.staged is not None:
                keep_bundles.add(st.staged.sha256)
            for h in (st.active, st.previous):
                if h is not None:
                    keep_releases.add(h.sha256)
        for d in (self.models, self.bundles, self.releases, self.downloads):
            for stale in d.glob(".*"):
                _remove(stale)
                removed.append(str(stale.relative_to(self.root)))
        for p in self.bundles.glob("*.edge"):
            if p.stem not in keep_bundles:
                _remove(p)
                removed.append(str(p.relative_to(self.root)))
        for p in self.releases.iterdir():
            if p.name not in keep_releases:
                _remove(p)
                removed.append(str(p.relative_to(self.root)))
        if removed:
            fsync_dir(self.releases)
            fsync_dir(self.bundles)
            log.info("cleaned up after an interrupted step: %s", ", ".join(removed))
        return removed

    # --- transitions (each one atomic write of the state file) --------------

    def stage(self, state: ModelState, *, version: str, sha256: str, verified_file: Path) -> ModelState:
        """Move a verified download into ``bundles/`` and record it as staged."""
        dest = self.bundle_path(sha256)
        verified_file.replace(dest)
        fsync_dir(self.bundles)
        failpoint.hit("stage.moved")
        old = state.staged
        new = replace(state, staged=Held(version=version, sha256=sha256, at=now_iso()),
                      seen={**state.seen, version: sha256}, last_error=None)
        self.save(new)
        if old is not None and old.sha256 != sha256:
            self.bundle_path(old.sha256).unlink(missing_ok=True)
        log.info("%s %s verified and staged (%s)", state.name, version, sha256[:12])
        return new

    def switch(self, state: ModelState, *, watch: Watch) -> ModelState:
        """The staged release (already in ``releases/``) becomes active; the active one becomes previous."""
        staged = state.staged
        assert staged is not None and self.release_dir(staged.sha256).is_dir(), "switch needs an installed release"
        new = replace(state, active=replace(staged, at=now_iso()), previous=state.active, staged=None, watch=watch,
                      last_error=None, outcome="ok")
        self.save(new)
        self.bundle_path(staged.sha256).unlink(missing_ok=True)
        return new

    def commit(self, state: ModelState) -> ModelState:
        """The watch window passed: keep the previous release for rollback, prune anything older."""
        new = replace(state, watch=None)
        self.save(new)
        self._prune(new)
        return new

    def rollback(self, state: ModelState, reason: str) -> ModelState:
        """The active release misbehaved: the previous one serves again, the failed one is refused."""
        failed = state.active
        assert failed is not None
        new = replace(state, active=state.previous, previous=None, watch=None, outcome="rolled_back",
                      refused={**state.refused, failed.sha256: reason[:300]}, last_error=reason[:300])
        self.save(new)
        self._prune(new)
        return new

    def refuse(self, state: ModelState, sha256: str, reason: str) -> ModelState:
        staged = state.staged if state.staged is not None and state.staged.sha256 == sha256 else None
        new = replace(state, refused={**state.refused, sha256: reason[:300]}, last_error=reason[:300],
                      staged=None if staged is not None else state.staged, outcome="failed")
        self.save(new)
        if staged is not None:
            self.bundle_path(sha256).unlink(missing_ok=True)
        return new

    def note_error(self, state: ModelState, reason: str | None) -> ModelState:
        if state.last_error == reason:
            return state
        new = replace(state, last_error=None if reason is None else reason[:300])
        self.save(new)
        return new

    def _prune(self, state: ModelState) -> None:
        keep = {h.sha256 for h in (state.active, state.previous) if h is not None}
        others = set()
        for name in self.model_names():
            if name != state.name:
                st = self.load(name)
                others |= {h.sha256 for h in (st.active, st.previous) if h is not None}
        for p in self.releases.iterdir():
            if p.name not in keep and p.name not in others and not p.name.startswith("."):
                _remove(p)
                log.info("%s: pruned release %s", state.name, p.name[:12])


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
