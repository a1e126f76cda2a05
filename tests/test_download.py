"""The resumable block downloader and the request channel, against the in-memory fake server."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.channel import ChannelClosed, RequestTimeout
from agent.config import UpdateLimits
from agent.download import DownloadStats, download, part_path, record_path
from agent.errors import BlockRejected, DownloadTimeout, LimitExceeded, LinkError, StorageError
from agent.protocol import MetaRequest, Reply, encode_reply
from tests.fakeserver import FakeServer, blocked_target

FAST = UpdateLimits(request_timeout=0.3, request_retries=3, blocks_in_flight=4, request_bytes=4096,
                    record_flush_interval=0.001, download_deadline=20)


def payload(n: int = 10 * 4096 + 123, seed: int = 1) -> bytes:
    return os.urandom(0) + bytes((i * 7 + seed) % 251 for i in range(n))


def setup(data: bytes, **knobs: object) -> tuple[FakeServer, object]:
    target = blocked_target(data)
    server = FakeServer(files={target.url_path: data}, **knobs)  # type: ignore[arg-type]
    return server, target


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_download_whole_file_in_blocks(tmp_path: Path) -> None:
    data = payload()
    server, target = setup(data)

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, FAST)  # type: ignore[arg-type]

    out = run(go())
    assert out.read_bytes() == data
    assert len(server.block_requests()) == 11
    assert not record_path(tmp_path, target).exists()  # type: ignore[arg-type]


def test_requests_span_several_blocks_when_asked(tmp_path: Path) -> None:
    data = payload()
    server, target = setup(data)
    limits = UpdateLimits(request_bytes=16384, request_timeout=1)

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, limits)  # type: ignore[arg-type]

    assert run(go()).read_bytes() == data
    assert [r.length for r in server.block_requests()] == [16384, 16384, 2 * 4096 + 123]


@pytest.mark.parametrize("knob", [
    {"corrupt_offsets": {3 * 4096}},
    {"substitute": payload(seed=9)},
])
def test_altered_or_foreign_block_is_refused(tmp_path: Path, knob: dict[str, object]) -> None:
    server, target = setup(payload(), **knob)

    async def go() -> None:
        await download(server.attach(), target, tmp_path, FAST)  # type: ignore[arg-type]

    with pytest.raises(BlockRejected, match="does not match its signed hash"):
        run(go())


def test_truncated_or_misplaced_reply_is_refused(tmp_path: Path) -> None:
    for knob in ({"truncate": True}, {"wrong_offset": True}):
        server, target = setup(payload(), **knob)

        async def go() -> None:
            await download(server.attach(), target, tmp_path, FAST)  # type: ignore[arg-type]

        with pytest.raises(BlockRejected, match="does not answer the request"):
            run(go())


def test_duplicated_and_reordered_replies_are_harmless(tmp_path: Path) -> None:
    data = payload()
    for knob in ({"duplicate": True}, {"reorder": True}):
        server, target = setup(data, **knob)
        ch = server.attach()

        async def go() -> Path:
            return await download(ch, target, tmp_path / str(knob), FAST)  # type: ignore[arg-type]

        assert run(go()).read_bytes() == data
        if "duplicate" in knob:
            assert ch.stats.unmatched == 11  # every duplicate dropped, none used twice


def test_lost_reply_is_asked_again(tmp_path: Path) -> None:
    data = payload()
    server, target = setup(data, drop_first={2 * 4096})
    stats = DownloadStats()

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, FAST, stats=stats)  # type: ignore[arg-type]

    assert run(go()).read_bytes() == data
    assert stats.retries == 1


def test_a_slow_link_busy_with_replies_times_no_request_out(tmp_path: Path) -> None:
    """On a link slower than the window (here 4 replies in flight, each taking 0.12 s, against a
    0.3 s request timeout) a request waits behind the replies before it. While answers keep
    arriving that is not a lost reply: asking again would only queue more bytes on the slow link."""
    data = payload()
    server, target = setup(data, link_interval=0.12)
    stats = DownloadStats()

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, FAST, stats=stats)  # type: ignore[arg-type]

    assert run(go()).read_bytes() == data
    assert stats.retries == 0 and len(server.block_requests()) == target.blocks  # type: ignore[attr-defined]


@pytest.mark.parametrize(("blocks", "interval", "latest"), [
    (11, 0.12, lambda n: n - 3),  # a slow link: the replies before the lost one come 0.12 s apart
    (96, 0.01, lambda n: n // 2 - 1),  # a busy link: 0.96 s of replies in all
], ids=["slow-link", "busy-link"])
def test_a_reply_lost_on_a_busy_link_is_asked_again_without_waiting_for_the_rest(
        tmp_path: Path, blocks: int, interval: float, latest: Callable[[int], int]) -> None:
    """Block 2's reply is lost while the link carries the others (0.3 s request timeout). The
    replies to requests sent before it say nothing (it may be queued behind them), but the first
    reply to one sent after it says it is lost: it is asked again then, not once the rest of the
    download is done (until then it holds a slot of the window, and the reader waits for it)."""
    data = payload(blocks * 4096 - 100)
    server, target = setup(data, link_interval=interval, drop_first={2 * 4096})
    stats = DownloadStats()

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, FAST, stats=stats)  # type: ignore[arg-type]

    assert run(go()).read_bytes() == data
    offsets = [r.offset for r in server.block_requests()]
    assert stats.retries == 1 and len(offsets) == target.blocks + 1  # type: ignore[attr-defined]
    asked_again = offsets.index(2 * 4096, offsets.index(2 * 4096) + 1)
    assert asked_again <= latest(len(offsets)), (asked_again, len(offsets))


def test_endless_data_is_cut_off(tmp_path: Path) -> None:
    server, target = setup(payload(), flood=3)

    async def go() -> None:
        await download(server.attach(), target, tmp_path, FAST)  # type: ignore[arg-type]

    with pytest.raises(LimitExceeded, match="abandoning"):
        run(go())


def test_oversize_bundle_refused_before_any_request(tmp_path: Path) -> None:
    server, target = setup(payload())

    async def go() -> None:
        await download(server.attach(), target, tmp_path, UpdateLimits(max_bundle_bytes=4096))  # type: ignore[arg-type]

    with pytest.raises(LimitExceeded, match="bundle limit"):
        run(go())
    assert server.requests == []


def test_stalled_stream_is_a_link_error_and_resumes_without_refetching(tmp_path: Path) -> None:
    data = payload()
    server, target = setup(data, silent_after=5)
    first = DownloadStats()

    async def go(s: FakeServer, stats: DownloadStats) -> Path:
        return await download(s.attach(), target, tmp_path, FAST, stats=stats)  # type: ignore[arg-type]

    with pytest.raises(LinkError):
        run(go(server, first))
    got_before = set(first.fetched_offsets)
    assert len(got_before) == 5
    assert record_path(tmp_path, target).exists()  # type: ignore[arg-type]

    healthy = FakeServer(files=server.files)
    second = DownloadStats()
    assert run(go(healthy, second)).read_bytes() == data
    assert second.blocks_resumed == 5
    refetched = {r.offset for r in healthy.block_requests()}
    assert not refetched & got_before  # no finished block asked for again
    assert len(refetched) == 11 - 5


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_the_part_file_holds_its_disk_space_before_the_first_block(tmp_path: Path) -> None:
    data = payload(64 * 4096)
    server, target = setup(data, silent_after=0)
    with pytest.raises(LinkError):
        run(download(server.attach(), target, tmp_path, FAST))  # type: ignore[arg-type]
    assert os.stat(part_path(tmp_path, target)).st_blocks * 512 >= len(data)  # type: ignore[arg-type]


def test_a_full_disk_fails_the_download_before_any_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    data = payload()
    server, target = setup(data)
    with pytest.raises(StorageError, match=f"no space on the device for a {len(data)}-byte download"):
        run(download(server.attach(), target, tmp_path, FAST))  # type: ignore[arg-type]
    assert server.block_requests() == []


def test_resume_rechecks_blocks_the_record_vouches_for(tmp_path: Path) -> None:
    data = payload()
    server, target = setup(data, silent_after=4)

    async def go(s: FakeServer, stats: DownloadStats) -> Path:
        return await download(s.attach(), target, tmp_path, FAST, stats=stats)  # type: ignore[arg-type]

    with pytest.raises(LinkError):
        run(go(server, DownloadStats()))
    part = part_path(tmp_path, target)  # type: ignore[arg-type]
    with open(part, "r+b") as f:  # a write the record claims, lost in a power cut
        f.seek(0)
        f.write(b"\0" * 4096)
    healthy = FakeServer(files=server.files)
    stats = DownloadStats()
    assert run(go(healthy, stats)).read_bytes() == data
    assert stats.blocks_resumed == 3
    assert 0 in {r.offset for r in healthy.block_requests()}


def test_deadline_stops_slow_retrieval(tmp_path: Path) -> None:
    server, target = setup(payload(), silent_after=1)
    limits = UpdateLimits(request_timeout=5, download_deadline=0.3, request_bytes=4096)

    async def go() -> None:
        await download(server.attach(), target, tmp_path, limits)  # type: ignore[arg-type]

    with pytest.raises(DownloadTimeout):
        run(go())


def test_channel_ignores_foreign_and_malformed_replies() -> None:
    server = FakeServer(meta={"timestamp.json": b"{}"})
    ch = server.attach()

    async def go() -> Reply:
        ch.deliver(b"garbage")
        ch.deliver(encode_reply(Reply(id="00ff00ff00ff00ff", status="ok", body=b"for someone else")))
        return await ch.request(MetaRequest(id=ch.new_id(), name="timestamp.json"), timeout=1)

    reply = run(go())
    assert reply.body == b"{}"  # type: ignore[union-attr]
    assert ch.stats.malformed == 1 and ch.stats.unmatched == 1


def test_channel_timeout_and_close() -> None:
    server = FakeServer(silent_after=0)
    ch = server.attach()

    async def timeout() -> None:
        await ch.request(MetaRequest(id=ch.new_id(), name="timestamp.json"), timeout=0.05)

    with pytest.raises(RequestTimeout):
        run(timeout())

    async def closed() -> None:
        task = asyncio.ensure_future(ch.request(MetaRequest(id=ch.new_id(), name="timestamp.json"), timeout=5))
        await asyncio.sleep(0.01)
        ch.close()
        await task

    with pytest.raises(ChannelClosed):
        run(closed())


def test_a_closed_channel_fails_every_later_request_at_once_unsent() -> None:
    """Once its session ended, a request on the channel could only wait out its timeout (or a
    publish that a disconnected paho queues): it fails at once instead, and nothing is sent."""
    server = FakeServer(meta={"timestamp.json": b"ts"})
    ch = server.attach()
    errors: list[LinkError] = []

    async def go() -> None:
        ch.close("session ended")
        with pytest.raises(ChannelClosed, match="session ended"):
            await ch.request(MetaRequest(id=ch.new_id(), name="timestamp.json"), timeout=30)
        ch.submit(MetaRequest(id=ch.new_id(), name="timestamp.json"), timeout=30,
                  on_reply=lambda r: errors.append(AssertionError(r)), on_error=errors.append)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)

    run(go())
    assert server.requests == [] and len(errors) == 1 and isinstance(errors[0], ChannelClosed)
    assert ch._pending == {}


def test_the_metadata_fetcher_does_not_ask_again_once_its_channel_closed() -> None:
    """A refresh whose session ends while it waits (SIGTERM, a lost broker) stops there: asking
    again on the ended session would hold the agent's exit for request_timeout per attempt."""
    from agent.trust import MqttFetcher

    server = FakeServer(silent_after=0)

    async def go() -> None:
        channel = server.attach()
        fetcher = MqttFetcher(channel, asyncio.get_running_loop(),
                              UpdateLimits(request_timeout=0.5, request_retries=3))
        worker = asyncio.ensure_future(asyncio.to_thread(_fetch_meta, fetcher, "2.root.json"))
        while len(server.requests) < 2:  # the root probe and the early timestamp are out
            await asyncio.sleep(0.01)
        channel.close("session ended")
        with pytest.raises(ChannelClosed, match="session ended"):
            await worker

    run(go())
    assert sorted(r.name for r in server.requests) == ["2.root.json", "timestamp.json"]  # type: ignore[union-attr]


def test_replies_nobody_asked_for_do_not_hold_off_a_timeout() -> None:
    """Only answers to pending requests show that the link works: a stream of forged or stray
    replies (every 10 ms, for as long as the request waits) cannot keep it waiting past its 0.1 s
    timeout. Were it held off, the 5 s guard would end the test with TimeoutError instead."""
    server = FakeServer(silent_after=0)
    ch = server.attach()

    async def go() -> None:
        loop = asyncio.get_running_loop()

        def stray() -> None:
            ch.deliver(encode_reply(Reply(id="00ff00ff00ff00ff00ff00ff", status="ok", body=b"x")))
            flood.append(loop.call_later(0.01, stray))

        flood = [loop.call_soon(stray)]
        try:
            await asyncio.wait_for(ch.request(MetaRequest(id=ch.new_id(), name="timestamp.json"), timeout=0.1), 5)
        finally:
            flood[-1].cancel()

    with pytest.raises(RequestTimeout):
        run(go())
    assert ch.stats.unmatched >= 5


def test_growing_reader_waits_for_checked_blocks_and_stops_on_abort(tmp_path: Path) -> None:
    import threading

    from agent.download import DownloadAborted, GrowingReader, Progress

    data = payload()
    target = blocked_target(data)
    path = tmp_path / "f.part"
    path.write_bytes(data)
    progress = Progress(target)
    reader = GrowingReader(path, progress)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(reader.read(3 * 4096)))
    t.start()
    progress.mark(1, 2)  # blocks 1-2 present, but not block 0: the prefix is not whole yet
    t.join(0.2)
    assert t.is_alive() and progress.whole == 0
    progress.mark(0, 1)
    t.join(2)
    assert got == [data[: 3 * 4096]]
    blocked = threading.Thread(target=lambda: got.append(reader.read(10 * 4096)))
    errors: list[BaseException] = []

    def read_rest() -> None:
        try:
            reader.read(10 * 4096)
        except DownloadAborted as e:
            errors.append(e)

    blocked = threading.Thread(target=read_rest)
    blocked.start()
    progress.abort()
    blocked.join(2)
    assert errors and not blocked.is_alive()
    reader.close()


@pytest.mark.parametrize("flush_bytes, expect_mid_flush", [(2 * 4096, True), (1 << 40, False)])
def test_record_is_flushed_every_so_many_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               flush_bytes: int, expect_mid_flush: bool) -> None:
    """Flushing by bytes (not only by time) keeps the disk writing during a fast download, so
    the fsync before staging has only the tail left; with neither due, nothing is flushed early."""
    import agent.download as dl

    monkeypatch.setattr(dl, "FLUSH_BYTES", flush_bytes)
    flushed: list[int] = []
    real_flush = dl._Record.flush

    def spy(self: dl._Record, part_fd: int) -> None:
        if self._dirty:
            flushed.append(len(self.done))
        real_flush(self, part_fd)

    monkeypatch.setattr(dl._Record, "flush", spy)
    data = payload()
    server, target = setup(data)
    limits = UpdateLimits(request_timeout=1, blocks_in_flight=1, request_bytes=4096, record_flush_interval=3600)

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, limits)  # type: ignore[arg-type]

    assert run(go()).read_bytes() == data
    assert bool(flushed) is expect_mid_flush
    assert all(0 < n < 11 for n in flushed)


# --- a reader in another thread checks the blocks (what the agent does: it verifies the bundle
# --- while it arrives, and the event loop only moves bytes)


def download_with_reader(server: FakeServer, target: object, workdir: Path, stats: DownloadStats,
                         fail_after: int | None = None, limits: UpdateLimits = FAST) -> tuple[object, object]:
    """(what download returned or raised, what the reader read or raised). The reader reads 5000
    bytes at a time, like a verifier that does not care about block boundaries; with
    ``fail_after``, it gives up after that many bytes, as a verifier that found the bundle bad."""
    import threading

    from agent.download import GrowingReader, Progress
    from agent.errors import ManifestError

    progress = Progress(target)  # type: ignore[arg-type]
    outcome: list[object] = []

    def read() -> None:
        reader = GrowingReader(part_path(workdir, target), progress)  # type: ignore[arg-type]
        got = bytearray()
        try:
            while chunk := reader.read(5000):
                assert len(chunk) == min(5000, target.length - len(got))  # type: ignore[attr-defined]  # as a file reads
                got += chunk
                if fail_after is not None and len(got) >= fail_after:
                    raise ManifestError("the verifier found the bundle bad")
            reader.drain()
            outcome.append(bytes(got))
        except BaseException as e:
            progress.failed(e)
            outcome.append(e)
        finally:
            reader.close()

    async def go() -> object:
        t = threading.Thread(target=read)
        t.start()
        try:
            return await download(server.attach(), target, workdir, limits, stats=stats,  # type: ignore[arg-type]
                                  progress=progress)
        except Exception as e:  # noqa: BLE001 - returned for the test to look at
            return e
        finally:
            progress.abort()
            await asyncio.to_thread(t.join, 5)

    workdir.mkdir(parents=True, exist_ok=True)
    part_path(workdir, target).touch()  # type: ignore[arg-type]
    result = run(go())
    return result, outcome[0] if outcome else None


def _cached(fd: int, offset: int) -> bool:
    """Is the page at ``offset`` in the page cache? (A read that may not wait for the disk.)"""
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


def _page_cache_lets_go(directory: Path) -> bool:
    """Does this filesystem drop clean pages on POSIX_FADV_DONTNEED, and can a read tell
    (tmpfs keeps its pages, and refuses RWF_NOWAIT reads)?"""
    probe = directory / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * 65536, 0)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return not _cached(fd, 0)
    except OSError:  # no RWF_NOWAIT reads here (tmpfs: EOPNOTSUPP): nothing to probe with
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"), reason="Linux only")
def test_what_the_reader_checked_leaves_the_page_cache_while_the_rest_arrives(tmp_path: Path) -> None:
    """A bundle is written once and read once more at install: the part the verifier has checked
    and a flush has put on disk is dropped from the page cache as the download goes on, so a
    download does not fill the cache with the bundle (nor grow it into fresh memory)."""
    if not _page_cache_lets_go(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} keeps clean pages cached, or cannot show which it keeps")
    block = 16384
    data = payload(48 * block)
    target = blocked_target(data, block_size=block)
    server = FakeServer(files={target.url_path: data}, delay=0.004)  # the reader keeps up with it
    limits = UpdateLimits(request_timeout=2, blocks_in_flight=1, request_bytes=block, record_flush_interval=0.001)
    result, read = download_with_reader(server, target, tmp_path, DownloadStats(), limits=limits)
    assert isinstance(result, Path) and read == data
    fd = os.open(result, os.O_RDONLY)
    try:
        cached = [_cached(fd, i * block) for i in range(target.blocks)]  # type: ignore[attr-defined]
        assert not any(cached[:8]), cached  # checked long before the last flush: let go
        assert os.pread(fd, len(data), 0) == data  # from the disk, whole
    finally:
        os.close(fd)


@pytest.mark.parametrize("knob", [{}, {"reorder": True}, {"duplicate": True}])
def test_a_reader_checks_every_block_and_the_download_ends_when_it_has(tmp_path: Path, knob: dict[str, object]) -> None:
    data = payload()
    server, target = setup(data, **knob)
    result, read = download_with_reader(server, target, tmp_path, DownloadStats())
    assert isinstance(result, Path) and result.read_bytes() == data
    assert read == data
    assert not record_path(tmp_path, target).exists()  # type: ignore[arg-type]


def test_a_block_the_reader_rejects_ends_the_download_and_the_next_attempt_fetches_only_it(tmp_path: Path) -> None:
    import json

    data = payload()
    server, target = setup(data, corrupt_offsets={3 * 4096})
    result, read = download_with_reader(server, target, tmp_path, DownloadStats())
    assert isinstance(result, BlockRejected) and "block 3 does not match" in str(result)
    assert isinstance(read, BlockRejected)
    done = set(json.loads(record_path(tmp_path, target).read_bytes())["done"])  # type: ignore[arg-type]
    assert {0, 1, 2, 3} <= done  # what was written is recorded, checked or not: a resume hashes it again

    healthy = FakeServer(files=server.files)
    stats = DownloadStats()
    result, read = download_with_reader(healthy, target, tmp_path, stats)
    assert isinstance(result, Path) and read == data
    assert stats.blocks_resumed == len(done) - 1  # the altered block fails its hash on resume
    assert {r.offset for r in healthy.block_requests()} == {i * 4096 for i in range(11) if i not in done or i == 3}


def test_blocks_written_past_a_gap_are_kept_when_the_download_fails(tmp_path: Path) -> None:
    """One block never answered: the reader waits at the gap, yet the blocks that arrived after it
    are recorded, so the next attempt asks only for the missing one."""
    import json

    data = payload()
    server, target = setup(data, drop_always={2 * 4096})
    result, read = download_with_reader(server, target, tmp_path, DownloadStats())
    assert isinstance(result, LinkError)
    done = json.loads(record_path(tmp_path, target).read_bytes())["done"]  # type: ignore[arg-type]
    assert done == [0, 1, *range(3, 11)]

    healthy = FakeServer(files=server.files)
    result, read = download_with_reader(healthy, target, tmp_path, DownloadStats())
    assert isinstance(result, Path) and read == data
    assert [r.offset for r in healthy.block_requests()] == [2 * 4096]


def test_a_reader_that_gives_up_stops_the_download_with_its_error(tmp_path: Path) -> None:
    from agent.errors import ManifestError

    server, target = setup(payload(), silent_after=8)  # were the download to wait for more, it would time out
    result, read = download_with_reader(server, target, tmp_path, DownloadStats(), fail_after=2 * 4096)
    assert isinstance(result, ManifestError) and result is read


def test_a_download_cancelled_twice_waits_for_its_background_flush(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is flushed in a worker thread that fsyncs the part file; the download must not
    close that file (and flush again on the loop) until the thread is done, even when a second
    cancellation interrupts the wait for it."""
    import threading
    import time

    import agent.download as dl

    started, finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    real_flush = dl._Record.flush

    def slow_flush(self: dl._Record, part_fd: int) -> None:
        if threading.current_thread() is threading.main_thread():
            return real_flush(self, part_fd)  # the download's own last flush, after the wait
        started.set()
        time.sleep(0.3)
        try:
            os.fstat(part_fd)  # still open?
            real_flush(self, part_fd)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
        finished.set()

    monkeypatch.setattr(dl._Record, "flush", slow_flush)
    monkeypatch.setattr(dl, "FLUSH_BYTES", 1)  # flush after the first block
    server, target = setup(payload(), silent_after=5)
    done_before_return: list[bool] = []

    async def go() -> None:
        task = asyncio.ensure_future(download(server.attach(), target, tmp_path, FAST))  # type: ignore[arg-type]
        while not started.is_set() and not task.done():
            await asyncio.sleep(0.01)
        assert started.is_set()
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        finally:
            done_before_return.append(finished.is_set())

    with pytest.raises(asyncio.CancelledError):
        run(go())
    assert done_before_return == [True] and not errors


def test_the_metadata_fetcher_turns_a_wait_past_its_cap_into_a_link_error() -> None:
    """python-tuf's fetcher runs in a worker thread and waits on the loop. If its request is not
    ended in time (the loop busy or gone) it gets a LinkError the agent handles (a link fault,
    refreshed again later), not a bare TimeoutError, and the request is forgotten."""
    from agent.trust import MqttFetcher

    server = FakeServer(silent_after=0)
    limits = UpdateLimits(request_timeout=0.05)  # the channel's own timer never runs: the loop is blocked

    async def go() -> None:
        channel = server.attach()
        fetcher = MqttFetcher(channel, asyncio.get_running_loop(), limits)
        worker = asyncio.ensure_future(asyncio.to_thread(lambda: b"".join(fetcher._fetch("edgeship-meta:/1.root.json"))))
        await asyncio.sleep(0.01)
        time.sleep(10.2)  # the loop stuck past the fetcher's cap (2 x 0.05 + 10 s)
        with pytest.raises(RequestTimeout, match="within 10.1 s"):
            await worker
        await asyncio.sleep(0.01)
        assert channel._pending == {}

    run(go())


def _fetch_meta(fetcher: object, name: str) -> bytes | None:
    """What python-tuf gets for ``name``: its bytes, or None for "not found"."""
    from tuf.api.exceptions import DownloadHTTPError

    from agent.trust import META_URL

    try:
        return b"".join(fetcher._fetch(META_URL + name))  # type: ignore[attr-defined]
    except DownloadHTTPError as e:
        assert e.status_code == 404
        return None


def test_a_root_probe_brings_the_timestamp_in_the_same_round_trip() -> None:
    """python-tuf asks for timestamp.json once the probe for root N+1 finds none: the fetcher asks
    for both at once, so a refresh with nothing new costs one round trip, not two."""
    from agent.trust import MqttFetcher

    server = FakeServer(meta={"timestamp.json": b"ts"}, delay=0.2)
    asked_when_delivered: list[list[str]] = []

    async def go() -> list[bytes | None]:
        channel = server.attach()
        deliver = channel.deliver

        def logged(payload: bytes) -> None:
            asked_when_delivered.append([r.name for r in server.requests])  # type: ignore[union-attr]
            deliver(payload)

        channel.deliver = logged  # type: ignore[method-assign]
        fetcher = MqttFetcher(channel, asyncio.get_running_loop(), UpdateLimits(request_timeout=5))
        return await asyncio.to_thread(lambda: [_fetch_meta(fetcher, "2.root.json"),
                                                _fetch_meta(fetcher, "timestamp.json")])

    assert run(go()) == [None, b"ts"]
    assert sorted(r.name for r in server.requests) == ["2.root.json", "timestamp.json"]  # type: ignore[union-attr]
    assert len(asked_when_delivered[0]) == 2  # both were asked before the first reply came


def test_a_timestamp_asked_with_a_probe_that_found_a_newer_root_is_asked_again() -> None:
    """Only the timestamp asked with the probe that ends the root chain is used, so it is never one
    fetched before the newest root was known (python-tuf checks it against that root)."""
    from agent.trust import MqttFetcher

    server = FakeServer(meta={"2.root.json": b"root 2", "timestamp.json": b"old"})

    async def go() -> list[bytes | None]:
        fetcher = MqttFetcher(server.attach(), asyncio.get_running_loop(), UpdateLimits(request_timeout=5))

        def tuf_side() -> list[bytes | None]:
            got = [_fetch_meta(fetcher, "2.root.json")]
            server.meta["timestamp.json"] = b"new"  # the repository moved on after root 2 was read
            return got + [_fetch_meta(fetcher, "3.root.json"), _fetch_meta(fetcher, "timestamp.json")]

        return await asyncio.to_thread(tuf_side)

    assert run(go()) == [b"root 2", None, b"new"]
    names = [r.name for r in server.requests]  # type: ignore[union-attr]
    assert names.count("timestamp.json") == 2 and names.count("3.root.json") == 1


def test_an_early_timestamp_nobody_asks_for_is_forgotten() -> None:
    """python-tuf may stop after the root probe (an expired root): ``close`` drops the early
    timestamp's request while it is still unanswered."""
    from agent.trust import MqttFetcher

    server = FakeServer(meta={"timestamp.json": b"ts"}, silent_after=1)  # the root probe is answered

    async def go() -> None:
        channel = server.attach()
        fetcher = MqttFetcher(channel, asyncio.get_running_loop(), UpdateLimits(request_timeout=5))
        assert await asyncio.to_thread(_fetch_meta, fetcher, "2.root.json") is None
        assert len(channel._pending) == 1 and server.requests[-1].name == "timestamp.json"  # type: ignore[union-attr]
        fetcher.close()
        await asyncio.sleep(0.01)
        assert channel._pending == {}

    run(go())


@pytest.mark.parametrize("limit_blocks", [1, 2, 3])
def test_requests_longer_than_the_server_takes_are_asked_again_smaller(tmp_path: Path, limit_blocks: int) -> None:
    """A server whose block limit is under the device's request size (an older or stricter
    deployment) answers bad_request: the device asks again for half as many blocks at a time,
    down to what the server takes, and the download completes with every block once."""
    data = payload(20 * 4096 + 99)
    server, target = setup(data, max_length=limit_blocks * 4096)
    limits = UpdateLimits(request_timeout=1, blocks_in_flight=3, request_bytes=8 * 4096)
    stats = DownloadStats()

    async def go() -> Path:
        return await download(server.attach(), target, tmp_path, limits, stats=stats)  # type: ignore[arg-type]

    assert run(go()).read_bytes() == data
    served = [r for r in server.block_requests() if r.length <= limit_blocks * 4096]
    assert sorted(r.offset for r in served) == list(range(0, len(data), served[0].length))  # each block once
    assert stats.narrowed >= 1 and stats.retries == 0


def test_a_refused_single_block_still_ends_the_download(tmp_path: Path) -> None:
    server, target = setup(payload(), max_length=100)
    stats = DownloadStats()

    async def go() -> None:
        limits = UpdateLimits(request_timeout=1, blocks_in_flight=1, request_bytes=4 * 4096)
        await download(server.attach(), target, tmp_path, limits, stats=stats)  # type: ignore[arg-type]

    with pytest.raises(BlockRejected, match="bad_request"):
        run(go())
    assert stats.narrowed == 2  # 4 blocks, then 2, then 1: refused
