"""The GGUF conversion cache under several processes: one conversion per file, published atomically, never removed
under a reader; a killed conversion's staging folder is cleaned; permissions follow the umask.

The dequantising step (`gguf.convert`) is replaced by a slow stand-in that writes files; the locking, staging and
publication code is the real one. The real conversion of SmolLM2 is tested in tests/test_real_model.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from accelerate import PartialState

from sstoken_trl.tools import gguf
from sstoken_trl.tools.gguf import RECORD, _is_current, cache_key, gguf_checkpoint

FILES = ("config.json", "model.safetensors", "tokenizer.json")
FORK = multiprocessing.get_context("fork")  # children inherit the stand-in conversion and the imported modules


def expected(name: str, source: Path) -> bytes:
    return name.encode() + source.read_bytes()


def stand_in(log: Path, pause: float = 0.2, fail: bool = False, die: bool = False) -> Callable[[Path, Path], None]:
    """A conversion that logs who ran it, then writes FILES one by one, `pause` seconds apart."""

    def convert(source: Path, folder: Path) -> None:
        with log.open("a") as handle:
            handle.write(os.environ.get("RANK", str(os.getpid())) + "\n")
        for name in FILES:
            time.sleep(pause)
            (folder / name).write_bytes(expected(name, source))
            if die:
                os.kill(os.getpid(), signal.SIGKILL)
        if fail:
            raise ValueError("stand-in conversion failed")

    return convert


def conversions(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def run_children(targets: list[Callable[[], None]], timeout: float = 60) -> list[int | None]:
    """Run each target in a forked process; their exit codes (None: still running at `timeout`, then killed)."""
    children = [FORK.Process(target=target) for target in targets]
    for child in children:
        child.start()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    codes = [child.exitcode for child in children]
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()
    return codes


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "models" / "tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(os.urandom(4096))
    return path


def test_processes_converting_one_file_at_once_share_one_conversion(tmp_path, source, monkeypatch):
    """Three independent processes start together: one converts, all read the same complete folder, and no read
    fails while the others finish (a reader keeps reading for a while after it got the folder)."""
    cache, log = tmp_path / "cache", tmp_path / "log"
    monkeypatch.setattr(gguf, "convert", stand_in(log))
    start = FORK.Barrier(3)

    def convert_and_read(index: int) -> None:
        start.wait()
        folder = Path(gguf_checkpoint(source, cache))
        reads = failures = 0
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            for name in FILES:
                try:
                    failures += (folder / name).read_bytes() != expected(name, source)
                except OSError:
                    failures += 1
                reads += 1
        result = {"folder": str(folder), "reads": reads, "failures": failures, "valid": _is_current(folder, source)}
        (tmp_path / f"result{index}.json").write_text(json.dumps(result))

    assert run_children([lambda i=i: convert_and_read(i) for i in range(3)]) == [0, 0, 0]
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(3)]
    assert len(conversions(log)) == 1  # converted once
    assert len({r["folder"] for r in results}) == 1 and all(r["valid"] for r in results)
    assert all(r["reads"] > 0 and r["failures"] == 0 for r in results)  # nothing removed under a reader
    key = cache_key(source)
    published = [p.name for p in cache.iterdir() if p.is_dir()]
    assert published == [Path(results[0]["folder"]).name] and published[0].startswith(f"{key}-")  # no staging left


def test_a_killed_conversions_staging_folder_is_removed_by_the_next_one(tmp_path, source, monkeypatch):
    cache, log = tmp_path / "cache", tmp_path / "log"
    monkeypatch.setattr(gguf, "convert", stand_in(log, pause=0.0, die=True))
    assert run_children([lambda: gguf_checkpoint(source, cache)]) == [-signal.SIGKILL]
    (left,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (left / FILES[0]).is_file() and not (left / RECORD).exists()  # the killed conversion's partial output
    other = cache / f"{cache_key(source.with_name('other.gguf'))}.staging-1-0123abcd"
    other.mkdir()  # another file's conversion in progress: its own lock covers it

    monkeypatch.setattr(gguf, "convert", stand_in(log, pause=0.0))
    folder = Path(gguf_checkpoint(source, cache))  # the killed process's lock went with it: no wait
    assert not left.exists() and other.is_dir()
    assert _is_current(folder, source) and all((folder / name).read_bytes() == expected(name, source) for name in FILES)
    assert len(conversions(log)) == 2


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_conversion_is_readable_as_the_umask_says(tmp_path, source, monkeypatch, umask):
    monkeypatch.setattr(gguf, "convert", stand_in(tmp_path / "log", pause=0.0))
    previous = os.umask(umask)
    try:
        folder = Path(gguf_checkpoint(source, tmp_path / "cache"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for name in (*FILES, RECORD):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_changed_file_gets_a_new_folder_and_the_old_one_stays(tmp_path, source, monkeypatch):
    cache, log = tmp_path / "cache", tmp_path / "log"
    monkeypatch.setattr(gguf, "convert", stand_in(log, pause=0.0))
    first = Path(gguf_checkpoint(source, cache))
    old_weights = (first / FILES[1]).read_bytes()
    assert gguf_checkpoint(source, cache) == str(first) and len(conversions(log)) == 1  # reused

    os.utime(source, ns=(1, 1))  # touched, same bytes: the same folder, its record updated to the new time
    assert gguf_checkpoint(source, cache) == str(first) and len(conversions(log)) == 1
    assert json.loads((first / RECORD).read_text())["mtime_ns"] == 1

    source.write_bytes(os.urandom(4096))  # new bytes: a new folder; the old one is left whole for its readers
    second = Path(gguf_checkpoint(source, cache))
    assert second != first and len(conversions(log)) == 2
    assert (second / FILES[1]).read_bytes() == expected(FILES[1], source) != old_weights
    assert (first / FILES[1]).read_bytes() == old_weights and not _is_current(first, source)
    assert _is_current(second, source) and gguf_checkpoint(source, cache) == str(second)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def as_rank(rank: int, port: int, work: Callable[[], None]) -> Callable[[], None]:
    """`work` in a process that is rank `rank` of a two-process gloo group set up by accelerate."""

    def target() -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        PartialState._reset_state()  # a fresh process's state: none until accelerate sets one up
        PartialState(cpu=True)
        work()

    return target


def test_under_accelerate_the_local_main_process_converts_and_the_other_waits(tmp_path, source, monkeypatch):
    """Rank 0 starts late: without accelerate's ordering rank 1 would take the lock and convert."""
    cache, log = tmp_path / "cache", tmp_path / "log"
    monkeypatch.setattr(gguf, "convert", stand_in(log))

    def work() -> None:
        rank = os.environ["RANK"]
        if rank == "0":
            time.sleep(1.0)
        (tmp_path / f"folder{rank}").write_text(gguf_checkpoint(source, cache))

    port = free_port()
    assert run_children([as_rank(0, port, work), as_rank(1, port, work)]) == [0, 0]
    assert conversions(log) == ["0"]
    folder = (tmp_path / "folder0").read_text()
    assert (tmp_path / "folder1").read_text() == folder and _is_current(Path(folder), source)


def test_under_accelerate_a_failed_conversion_fails_every_process_without_a_hang(tmp_path, source, monkeypatch):
    cache, log = tmp_path / "cache", tmp_path / "log"
    monkeypatch.setattr(gguf, "convert", stand_in(log, pause=0.0, fail=True))

    def work() -> None:
        try:
            gguf_checkpoint(source, cache)
        except (ValueError, RuntimeError) as error:
            (tmp_path / f"error{os.environ['RANK']}").write_text(str(error))

    port = free_port()
    assert run_children([as_rank(0, port, work), as_rank(1, port, work)], timeout=60) == [0, 0]
    assert conversions(log) == ["0"]  # the other process does not repeat a conversion that failed
    assert (tmp_path / "error0").read_text() == "stand-in conversion failed"
    assert "local main process did not convert" in (tmp_path / "error1").read_text()
    assert not any(p.is_dir() for p in cache.iterdir())  # nothing published, the failed staging removed


def test_no_accelerate_state_is_created_where_none_exists(tmp_path, source, monkeypatch):
    monkeypatch.setattr(gguf, "convert", stand_in(tmp_path / "log", pause=0.0))

    def work() -> None:
        PartialState._reset_state()
        gguf_checkpoint(source, tmp_path / "cache")
        (tmp_path / "state").write_text(json.dumps(dict(PartialState._shared_state), default=str))

    assert run_children([work]) == [0]
    assert json.loads((tmp_path / "state").read_text()) == {}


def test_another_transformers_or_gguf_version_converts_again(tmp_path, source, monkeypatch):
    """A conversion is keyed on the versions that made it: another one may read the file differently."""
    cache, log = tmp_path / "cache", tmp_path / "log"
    monkeypatch.setattr(gguf, "convert", stand_in(log, pause=0))
    first = gguf_checkpoint(source, cache)
    assert gguf_checkpoint(source, cache) == first and len(conversions(log)) == 1  # same versions: reused
    monkeypatch.setattr(gguf.transformers, "__version__", "9.99.0")
    second = gguf_checkpoint(source, cache)
    monkeypatch.setattr(gguf, "version", lambda name: "0.0.1")
    third = gguf_checkpoint(source, cache)
    assert len({first, second, third}) == 3 and len(conversions(log)) == 3
    assert all(Path(folder).is_dir() for folder in (first, second, third))  # the others stay for their runs
    recorded = json.loads((Path(third) / RECORD).read_text())["converted_by"]
    assert recorded == {"transformers": "9.99.0", "gguf": "0.0.1"}
