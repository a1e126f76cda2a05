"""What serves on this device: install staged releases, switch, watch, commit or roll back.

One :class:`Deployer` per agent. It keeps the model host (what answers
inference requests) in step with the store (what the state files say):

* ``start()`` cleans up after a crash and loads every model's active release;
* ``install(model)`` prepares the staged release (agent.install), switches the
  state file, swaps the model into the host, and opens the watch window;
* ``check_watches()`` commits a release that served its window cleanly, or
  rolls back to the previous one on errors, NaN/Inf outputs or latency over
  budget. The decision itself is :func:`judge`, a pure function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent import failpoint
from agent.aio import wait_event
from agent.config import InstallConfig, WatchConfig
from agent.errors import BadData, EdgeshipError
from agent.install import Release, load_release, prepare
from agent.keys import TrustedKey
from agent.select import DeviceFacts
from agent.store import ModelState, Store, Watch, now_iso

log = logging.getLogger(__name__)


class Counters(Protocol):
    @property
    def sha256(self) -> str: ...
    @property
    def inferences(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def nonfinite(self) -> int: ...
    @property
    def over_budget(self) -> int: ...


class Host(Protocol):
    """The part of agent.host.ModelHost the deployer uses (a fake stands in for it in unit tests)."""

    def activate(self, model: str, *, version: str, sha256: str, model_path: Any, runtime: Any, manifest: Any,
                 threads: int = 1, latency_budget_ms: float = 0.0, watching: bool = True) -> None: ...

    def deactivate(self, model: str) -> None: ...

    def end_watch(self, model: str) -> None: ...

    def watch_counters(self, model: str) -> Counters: ...


Verdict = Literal["wait", "commit", "rollback"]


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


def judge(counters: Counters, *, watch: Watch, elapsed: float) -> Judgement:
    """Commit, roll back, or keep watching. Faults win over a full window."""
    if counters.errors:
        return Judgement("rollback", f"{counters.errors} failed inference(s) in the watch window")
    if counters.nonfinite:
        return Judgement("rollback", f"{counters.nonfinite} inference(s) produced NaN or Inf")
    if counters.over_budget:
        return Judgement("rollback", f"{counters.over_budget} inference(s) over the latency budget")
    if counters.inferences >= watch.inferences:
        return Judgement("commit", f"{counters.inferences} clean inferences")
    if elapsed >= watch.seconds:
        return Judgement("commit", f"{elapsed:.0f} s without a fault")
    return Judgement("wait")


Emit = Callable[..., None]


class Deployer:
    def __init__(self, store: Store, host: Host, *, facts: DeviceFacts, watch: WatchConfig, install: InstallConfig,
                 emit: Emit) -> None:
        self.store = store
        self.host = host
        self.facts = facts
        self.watch_cfg = watch
        self.install_cfg = install
        self._emit = emit
        self._keys: tuple[TrustedKey, ...] = ()
        """Release keys of the last refresh: a release staged during a watch window installs after it."""
        self._watch_started: dict[str, float] = {}
        """model -> monotonic time its watch window (re)started in this process."""

    # --- start --------------------------------------------------------------

    def start(self, models: Sequence[str]) -> None:
        """After a (re)start: remove leftovers, then serve every model's active release."""
        self.store.recover()
        for model in models:
            state = self.store.load(model)
            if state.active is None:
                continue
            try:
                self._activate(state, load_release(self.store, state.active))
            except (EdgeshipError, OSError) as e:
                log.error("%s %s cannot be loaded (%s)", model, state.active.version, e)
                self._rollback(state, f"cannot load after restart: {e}")

    def _activate(self, state: ModelState, release: Release) -> None:
        watching = state.watch is not None and state.watch.sha256 == release.sha256
        self.host.activate(state.name, version=release.version, sha256=release.sha256, model_path=release.model_path,
                           runtime=release.manifest.runtime.name, manifest=release.manifest,
                           threads=self.install_cfg.threads,
                           latency_budget_ms=self.watch_cfg.latency_budget_ms if watching else 0.0,
                           watching=watching)
        if watching:
            self._watch_started[state.name] = time.monotonic()
        log.info("%s %s serving (%s)", state.name, release.version, "watching" if watching else "committed")

    # --- install ------------------------------------------------------------

    async def install(self, model: str, trusted_keys: Sequence[TrustedKey]) -> None:
        """Install the staged release of ``model``, if any. Bad data refuses it; other errors leave it staged."""
        state = self.store.load(model)
        staged = state.staged
        self._keys = tuple(trusted_keys)
        if staged is None:
            return
        if state.watch is not None:
            log.info("%s: %s waits until %s leaves its watch window", model, staged.version,
                     state.active.version if state.active else "?")
            return
        self._emit("installing", model=model, version=staged.version)
        try:
            release = await asyncio.to_thread(prepare, self.store, staged, trusted_keys=trusted_keys,
                                              facts=self.facts, reserve_bytes=self.install_cfg.reserve_bytes,
                                              threads=self.install_cfg.threads)
        except BadData as e:
            self.store.refuse(state, staged.sha256, f"{type(e).__name__}: {e}")
            self._emit("refused", model=model, version=staged.version, error=type(e).__name__, detail=str(e))
            raise
        failpoint.hit("switch.before")
        watch = Watch(sha256=release.sha256, started=now_iso(), inferences=self.watch_cfg.inferences,
                      seconds=self.watch_cfg.seconds)
        state = self.store.switch(state, watch=watch)
        failpoint.hit("switch.after")
        self._emit("installed", model=model, version=release.version, sha256=release.sha256)
        try:
            await asyncio.to_thread(self._activate, state, release)  # loading a model can take seconds
        except (EdgeshipError, OSError) as e:
            self._rollback(state, f"cannot load: {e}")
            return
        self._emit("watching", model=model, version=release.version, inferences=watch.inferences,
                   seconds=watch.seconds)

    # --- watch --------------------------------------------------------------

    def check_watches(self, models: Sequence[str]) -> list[str]:
        """Decide every open watch window; returns the models with a release waiting to install."""
        waiting = []
        for model in models:
            state = self.store.load(model)
            if state.watch is None or state.active is None:
                continue
            counters = self.host.watch_counters(model)
            if counters.sha256 != state.watch.sha256:
                continue
            started = self._watch_started.setdefault(model, time.monotonic())
            verdict = judge(counters, watch=state.watch, elapsed=time.monotonic() - started)
            if verdict.verdict == "commit":
                failpoint.hit("watch.commit")
                self.store.commit(state)
                self.host.end_watch(model)
                self._watch_started.pop(model, None)
                self._emit("committed", model=model, version=state.active.version, detail=verdict.reason)
            elif verdict.verdict == "rollback":
                self._rollback(state, verdict.reason)
            if verdict.verdict != "wait" and self.store.load(model).staged is not None:
                waiting.append(model)
        return waiting

    def _rollback(self, state: ModelState, reason: str) -> None:
        failed = state.active
        assert failed is not None
        failpoint.hit("watch.rollback")
        state = self.store.rollback(state, reason)
        self._watch_started.pop(state.name, None)
        if state.active is None:
            self.host.deactivate(state.name)
        else:
            self._activate(state, load_release(self.store, state.active))
        log.warning("%s %s rolled back: %s", state.name, failed.version, reason)
        self._emit("rolled_back", model=state.name, version=failed.version, detail=reason,
                   now_serving=None if state.active is None else state.active.version)

    async def watch_loop(self, models: Sequence[str], stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for model in self.check_watches(models):
                    if self._keys:
                        await self.install(model, self._keys)
            except EdgeshipError as e:
                log.error("watch check or deferred install failed: %s", e)
            await wait_event(stop, self.watch_cfg.check_interval)
