"""A thin wrapper over a transformers tokenizer: encode/decode, chat template, stop ids.

Tokenization itself is transformers' (for GGUF files it builds the tokenizer and chat
template from the file's metadata); this class only fixes the API the engine uses.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from pdmesh.runtime import gguf_readers


class Tokenizer:
    """Wraps a transformers tokenizer (`hf`)."""

    def __init__(self, hf: Any, eos_token_ids: Iterable[int] = ()) -> None:
        """`eos_token_ids`: the model config's stop ids, merged with the tokenizer's eos."""
        self.hf = hf
        own = [] if hf.eos_token_id is None else [int(hf.eos_token_id)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*own, *map(int, eos_token_ids)]))
        self.bos_token_id: int | None = hf.bos_token_id
        # len() counts added tokens too; the model's vocab may still be larger (padded)
        self.vocab_size: int = len(hf)

    @classmethod
    def from_path(cls, path: Path, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """Load from a HF model folder or a .gguf file; ValueError names the path on failure."""
        path = Path(path)
        try:
            if path.is_dir():
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(str(path))
            else:
                hf = _from_gguf(path)
        except Exception as e:  # transformers raises many types for missing/odd tokenizer data
            raise ValueError(f"{path}: cannot build a tokenizer ({type(e).__name__}: {e})") from e
        return cls(hf, eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids (with BOS etc. when the tokenizer adds them and add_special_tokens)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Token ids -> token strings (byte-level pieces, not decoded text)."""
        return self.hf.convert_ids_to_tokens(list(ids))

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Render `messages` with the model's chat template and tokenize the result."""
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        _check_messages(messages)
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja TemplateError, e.g. "roles must alternate"
            raise ValueError(f"chat template failed: {e}") from e
        # the template already contains any BOS it wants, as transformers does
        return self.encode(text, add_special_tokens=False)


def _from_gguf(path: Path) -> Any:
    """The tokenizer transformers builds from a GGUF file's metadata, cached as a HF
    tokenizer folder: building it parses the whole file (seconds for a 49k vocab), and
    every process of a mesh (gateway, each worker) needs it. The cache key is the file's
    path, size and mtime, so a changed file is converted again."""
    from pdmesh.config import cache_dir

    st = path.resolve().stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    folder = cache_dir() / "tokenizers" / key[:16]
    if (folder / "tokenizer.json").is_file():
        # our own folder holds a fast tokenizer: its class directly, not AutoTokenizer,
        # whose import pulls torch and, on some hosts, torch.distributed and scikit-learn
        # (seconds of every GPU worker's and gateway's start: 7.35 s on the H200 host)
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer  # only on a file's first load

    with gguf_readers.lent_to_transformers(path):  # the loader's parse, when it made one
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:  # write aside, then rename: concurrent starts never read half a folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        hf.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except OSError:  # read-only home, or another process won the rename: no cache
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return hf


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        if not isinstance(m.get("content"), (str, list)):
            raise ValueError(f"messages[{i}] must have 'content' (a string or a list of parts)")

