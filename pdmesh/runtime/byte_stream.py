"""Token ids -> text for byte-level BPE tokenizers, exact to the byte.

A byte-level BPE vocabulary (GPT-2's scheme: SmolLM2, Llama 3, Qwen, ...) spells every
token as bytes, each byte written as one printable stand-in character. Its decode is
"map each token's characters back to bytes, concatenate, UTF-8 decode with replacement".
So the text that is safe to stream after each token is known exactly: the complete
characters of the bytes so far. An incremental UTF-8 decoder gives them and keeps only
an incomplete character's first bytes.

The sliding window (detokenizer.py, and `tokenizers`' DecodeStream) cannot tell a split
character from a genuine U+FFFD: it holds back any text that ends in U+FFFD until a
later token's text does not. A model that writes the character U+FFFD (a token of its
own in these vocabularies) then streamed nothing until the request ended: on the H200,
one prompt of serve_gpu's workload answered 128 such tokens and its first text reached
the client with its last (TTFT ~150 ms against ~25 ms). Here it streams at once. The
decoder may be ByteLevel alone or last in a Sequence of steps that change no token of
the vocabulary (what transformers 5.17, the H200 image's, builds from a GGUF).

The result equals `tokenizer.decode(ids, skip_special_tokens)` (tests/test_byte_stream.py
checks that over the whole vocabulary and random sequences): a token whose characters
are not all byte stand-ins (an added token such as "<|im_end|>" is plain text) counts as
its own UTF-8 bytes, as the `tokenizers` ByteLevel decoder does.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Any


def _byte_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_CHAR_BYTE = _byte_table()


class ByteVocab:
    """One tokenizer's token bytes, looked up lazily and kept (shared by its streams)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            tok = self.backend.id_to_token(token_id)
            if tok is None:  # out of the vocabulary: decode() skips it as well
                b = b""
            elif all(c in _CHAR_BYTE for c in tok):
                b = bytes(_CHAR_BYTE[c] for c in tok)
            else:
                b = tok.encode("utf-8")
            self._bytes[token_id] = b
        return b


# id(backend) -> (it, its vocab or None when its decode is not bytes); tokenizers live long
_VOCABS: dict[int, tuple[Any, ByteVocab | None]] = {}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what ByteFallback turns into a byte
_VERBATIM: dict[int, tuple[Any, bool]] = {}  # id(tokenizer) -> (it, decodes verbatim)
# text that transformers' clean_up_tokenization would change (" ," -> ",", " 's" -> "'s")
_PROBE = "a , b . c ! d ? e 's f n't g"


def decodes_verbatim(hf: Any) -> bool:
    """Whether `hf.decode` returns its tokens' text as the `tokenizers` backend decodes
    it, without transformers' clean-up of spaces. transformers 5 keeps the attribute
    `clean_up_tokenization_spaces=True` on BPE tokenizers loaded from a GGUF but ignores
    it (with a warning), so the attribute alone would send them to the slow path: a
    decode of a probe text answers (once per tokenizer)."""
    if not getattr(hf, "clean_up_tokenization_spaces", False):
        return True
    known = _VERBATIM.get(id(hf))
    if known is None or known[0] is not hf:
        try:
            ok = hf.decode(hf.encode(_PROBE, add_special_tokens=False)) == _PROBE
        except Exception:  # noqa: BLE001 - no encode/decode to probe: assume clean-up
            ok = False
        known = _VERBATIM[id(hf)] = (hf, ok)
    return known[1]


def byte_vocab(tokenizer: Any) -> ByteVocab | None:
    """The tokenizer's ByteVocab when its decode is byte-level BPE and nothing else
    (a `tokenizers` ByteLevel decoder, no Python-side clean-up), else None."""
    hf = getattr(tokenizer, "hf", tokenizer)  # pdmesh Tokenizer wraps a transformers one
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or not decodes_verbatim(hf):
        return None
    known = _VOCABS.get(id(backend))
    if known is None or known[0] is not backend:
        ok = _decodes_bytes(backend)
        known = _VOCABS[id(backend)] = (backend, ByteVocab(backend) if ok else None)
    return known[1]


def _decodes_bytes(backend: Any) -> bool:
    """Whether the backend's decoder is ByteLevel, alone or last in a Sequence whose
    other steps change none of this vocabulary's tokens. transformers 5.17 builds
    SmolLM2's from a GGUF as Sequence[ByteFallback, Fuse, Replace("\u2581", " "),
    ByteLevel]: no token is a "<0xNN>" byte or holds "\u2581", so it is ByteLevel."""
    try:
        spec = json.loads(backend.decoder.__getstate__())
    except Exception:  # noqa: BLE001 - no decoder, or one that does not serialize
        return False
    steps = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    if not steps or steps[-1].get("type") != "ByteLevel":
        return False
    vocab = None
    for step in steps[:-1]:
        kind = step.get("type")
        if kind == "Fuse":  # joins the tokens' strings, as ByteLevel does anyway
            continue
        vocab = vocab if vocab is not None else backend.get_vocab()
        if kind == "ByteFallback" and not any(_BYTE_TOKEN.fullmatch(t) for t in vocab):
            continue
        pattern = step.get("pattern", {}).get("String")
        if kind == "Replace" and pattern and not any(pattern in t for t in vocab):
            continue
        return False
    return True


class ByteStream:
    """One request's output: `step(id)` -> the new complete text ("" while a character
    is incomplete); `flush()` -> what is left (an incomplete character as U+FFFD)."""

    def __init__(self, vocab: ByteVocab, skip_special_tokens: bool) -> None:
        self.vocab, self.skip = vocab, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        if self.skip and token_id in self.vocab.special:
            return ""
        return self._utf8.decode(self.vocab.bytes_of(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
