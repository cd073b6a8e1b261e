"""Incremental detokenization of one request's output, with stop strings.

Two layers:
  1. Token -> text, with a sliding window (the TGI/vLLM/HF-TextStreamer technique). We
     decode `ids[prefix:read]` (text already emitted) and `ids[prefix:]`; the difference
     is new text. It is emitted only when it does not end in U+FFFD, i.e. when no UTF-8
     character is split across tokens still to come; then the window slides forward
     (prefix <- read, read <- end). Each step decodes a few tokens, not the whole output.
     The window starts on the last few prompt tokens, so tokenizers that drop a leading
     space at the start of a decode (SentencePiece) still produce it for the first output
     token.
  2. Stop strings: text that contains a stop string is truncated before it (OpenAI
     semantics), and the longest tail that could still begin a stop string is held back
     until decided; `flush()` releases it when the request ends without stopping.

Invariant for (2): the emitted text never contains a prefix of a stop occurrence that
later completes, so stop strings only need to be searched for in pending + new text.

Layer (1) runs in Rust when it can: a tokenizer backed by HF `tokenizers` (a "fast"
tokenizer that does no Python-side clean-up of the decoded text) gets a
`tokenizers.decoders.DecodeStream`, which implements the same window (same prefix/read
offsets, same U+FFFD rule) without two Python-level decode calls per token. The Python
window is kept in step with it and takes over for the final flush (which emits an
incomplete character as U+FFFD), for tokenizers without a Rust backend, and if
DecodeStream ever refuses a step. A byte-level BPE tokenizer (the default model's) needs
no window at all: byte_stream.py decodes its tokens' bytes exactly, so a genuine U+FFFD
in the output streams at once instead of being held to the end as a split character.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from pdmesh.runtime.byte_stream import ByteStream, byte_vocab, decodes_verbatim

# Prompt tokens used as left context for the first output token (as vLLM).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output tokens into streamable text deltas.

    Usage: `delta, stopped = detok.add(token_id)` per generated token; when the request
    ends for another reason (max_tokens, eos, stop token id), `detok.flush()` returns the
    text still held back. Concatenating all deltas and the flush gives `detok.text`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = tuple(stop)
        if any(not s for s in self._stop):
            raise ValueError(f"stop strings must be non-empty, got stop={self._stop!r}")
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = self._prompt_context(prompt_ids)  # context + output ids
        self._prefix = 0  # window start: decode(ids[prefix:read]) is already-emitted text
        self._read = len(self._ids)  # first id whose text has not been produced yet
        self._output_ids: list[int] = []
        self._emitted: list[str] = []  # deltas returned so far
        self._pending = ""  # decided-later text: might be the start of a stop string
        self._stopped = False
        self._stop_str: str | None = None
        vocab = byte_vocab(tokenizer)
        self._bytes = ByteStream(vocab, skip_special_tokens) if vocab is not None else None
        self._backend, self._stream = ((None, None) if self._bytes is not None else
                                       _decode_stream(tokenizer, self._ids, skip_special_tokens))

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """Last few prompt ids, or none if they end inside a multi-byte character
        (their text would change once the output completes it)."""
        ctx = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        return [] if self._decode(ctx).endswith(REPLACEMENT_CHAR) else ctx

    @property
    def output_ids(self) -> list[int]:
        """Token ids added so far (including a final stop-triggering one). Do not mutate."""
        return self._output_ids

    @property
    def text(self) -> str:
        """All text emitted so far plus text held back; truncated before a matched stop."""
        return "".join(self._emitted) + self._pending

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the request, if any."""
        return self._stop_str

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token. Returns (text safe to stream now, stopped).

        After a stop, further calls are ignored and return ("", True).
        """
        if self._stopped:
            return "", True
        self._ids.append(token_id)
        self._output_ids.append(token_id)
        text = self._next_text(final=False)
        if not text and self._stop and self._bytes is None:
            # (the byte path's text is every complete character already)
            # a character is incomplete, but the complete text before it may already
            # complete a stop string (e.g. stop " " in "a" + " \xc3"): stop at this token
            peek = self._peek_complete()
            if peek and self._find_stop(self._pending + peek) is not None:
                return self._advance(peek, final=False)
        return self._advance(text, final=False)

    def flush(self) -> str:
        """Release everything still held back (request ended without a stop string):
        pending stop-string prefixes and any incomplete character (as U+FFFD)."""
        if self._stopped:
            return ""
        delta, _ = self._advance(self._next_text(final=True), final=True)
        return delta

    def _next_text(self, final: bool) -> str:
        """New text from the sliding window; "" while a character is incomplete."""
        if self._bytes is not None:
            return self._bytes.flush() if final else self._bytes.step(self._ids[-1])
        if self._stream is not None and not final:
            try:
                text = self._stream.step(self._backend, self._ids[-1])
            except Exception:  # noqa: BLE001 - e.g. InvalidPrefix: the Python window goes on
                self._stream = None
                return self._window_text(final)
            if text is None:
                return ""
            self._prefix, self._read = self._read, len(self._ids)
            return text
        return self._window_text(final)

    def _window_text(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: keep the window where it is
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # incomplete UTF-8 character; wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text):]

    def _peek_complete(self) -> str:
        """The complete text after the window's read offset while its last character is
        incomplete (not emitted: it comes again with the character's last byte)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:]).rstrip(REPLACEMENT_CHAR)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""

    def _advance(self, new_text: str, final: bool) -> tuple[str, bool]:
        """Append new text to pending, apply stop strings, emit what is decided."""
        buf = self._pending + new_text
        cut = self._find_stop(buf)
        if cut is not None:
            delta, self._pending, self._stopped = buf[:cut], "", True
        else:
            hold = 0 if final else self._held_back_len(buf)
            delta, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        if delta:
            self._emitted.append(delta)
        return delta, self._stopped

    def _find_stop(self, buf: str) -> int | None:
        """Index of the earliest stop-string occurrence in buf (records which), or None."""
        best: int | None = None
        for s in self._stop:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best):
                best, self._stop_str = i, s
        return best

    def _held_back_len(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0


def _decode_stream(tokenizer: Any, context: list[int], skip: bool) -> tuple[Any, Any]:
    """(Rust tokenizer, DecodeStream primed with `context`) or (None, None) when the
    tokenizer has no `tokenizers` backend or post-processes decoded text in Python."""
    hf = getattr(tokenizer, "hf", tokenizer)  # pdmesh Tokenizer wraps a transformers one
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or not decodes_verbatim(hf):
        return None, None
    try:
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers.decoders import DecodeStream

        if not isinstance(backend, RustTokenizer):
            return None, None
        return backend, DecodeStream(ids=list(context), skip_special_tokens=skip)
    except (ImportError, TypeError):  # tokenizers < 0.21, or no `ids` before 0.22
        return None, None


def warm_up(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
    """Do once, ahead of serving, what a process's first detokenizer would do lazily: the
    checks that pick its path (a probe decode, a scan of the vocabulary: 40-60 ms inside
    the first request of each gateway process on the H200, transformers 5.17) and one
    token's decode. `prompt_ids`: any few ids of the tokenizer."""
    ids = list(prompt_ids)
    detok = IncrementalDetokenizer(tokenizer, ids[:-1], stop=("\n\n",))
    detok.add(ids[-1])
    detok.flush()
