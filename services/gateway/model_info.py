"""What the gateway knows of the model: its tokenizer and context length, no weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdmesh.runtime import gguf_readers
from pdmesh.runtime.tokenizer import Tokenizer


@dataclass
class ModelInfo:
    """What the gateway needs of the model: its tokenizer and context length (no weights)."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    # token ids a prompt may hold are [0, vocab_size) (None: not checked here, the
    # workers still check)
    vocab_size: int | None = None


def load_model_info(model: str, served_name: str | None = None,
                    max_model_len: int | None = None) -> ModelInfo:
    """Tokenizer + context length of `model` ("default", HF folder, .gguf), read from
    its config/metadata only (as `load_model` builds the tokenizer, minus the weights)."""
    from pdmesh.runtime.loader import resolve_model_path

    path = resolve_model_path(model)
    with gguf_readers.one_parse():  # a cold GGUF: its config's parse builds the tokenizer
        return _load(path, model, served_name, max_model_len)


def _load(path: Path, model: str, served_name: str | None,
          max_model_len: int | None) -> ModelInfo:
    from pdmesh.runtime.loader import model_format, read_hf_config

    if model_format(path) == "gguf":
        from pdmesh.runtime.weights_cache import cached_config

        config = cached_config(path)  # a worker's load left it (serve starts them first)
        if config is None:
            from pdmesh.runtime.gguf_loader import gguf_config, open_gguf

            reader = open_gguf(path)
            config = gguf_config(reader, {t.name: t for t in reader.tensors}, Path(path))
    else:
        config = read_hf_config(path)
    tokenizer = Tokenizer.from_path(path, eos_token_ids=config.eos_token_ids)
    return ModelInfo(served_name or model, tokenizer,
                     max_model_len or config.max_position_embeddings, config.vocab_size)
