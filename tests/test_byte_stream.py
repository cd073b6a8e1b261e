"""byte_stream.py against the tokenizer's own decode: every token alone, random sequences
(byte fragments, special tokens, invalid UTF-8), and what it refuses to handle."""
from __future__ import annotations

import random

import pytest

from pdmesh.runtime.byte_stream import ByteStream, byte_vocab
from test_detokenizer import GGUF_DIR, GGUF_NAME


@pytest.fixture(scope="module")
def tok():
    if not (GGUF_DIR / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)


def run(vocab, ids, skip):
    s = ByteStream(vocab, skip)
    steps = [s.step(i) for i in ids]
    return steps, s.flush()


def test_every_token_alone_decodes_as_the_tokenizer(tok):
    vocab = byte_vocab(tok)
    assert vocab is not None and vocab.special  # SmolLM2: ByteLevel, 17 special tokens
    for i in range(tok.backend_tokenizer.get_vocab_size()):
        for skip in (True, False):
            steps, tail = run(vocab, [i], skip)
            assert steps[0] + tail == tok.decode([i], skip_special_tokens=skip), i


def test_random_sequences_decode_as_the_tokenizer(tok):
    vocab, rng = byte_vocab(tok), random.Random(7)
    V = tok.backend_tokenizer.get_vocab_size()
    for _ in range(2000):
        # byte stand-in tokens (low ids) often, to split and break characters
        ids = [rng.randrange(V) if rng.random() < 0.5 else rng.randrange(0, 600)
               for _ in range(rng.randrange(1, 30))]
        skip = rng.random() < 0.7
        steps, tail = run(vocab, ids, skip)
        assert "".join(steps) + tail == tok.decode(ids, skip_special_tokens=skip), ids


def test_a_split_character_waits_only_for_its_own_bytes(tok):
    ids = tok.encode("a🤖b", add_special_tokens=False)
    steps, tail = run(byte_vocab(tok), ids, True)
    assert "".join(steps) == "a🤖b" and tail == ""
    assert steps[0] == "a" and steps[-1].endswith("b")
    assert "\ufffd" not in "".join(steps)  # never a half character on the way


def test_other_decoders_are_left_to_the_window(tok):
    class NoBackend:
        decode = tok.decode
    assert byte_vocab(NoBackend()) is None

    class Cleaned:  # Python-side clean-up of spaces: not the bytes' text
        backend_tokenizer = tok.backend_tokenizer
        clean_up_tokenization_spaces = True
        encode = tok.encode

        def decode(self, ids, **kw):
            return tok.decode(ids, **kw).replace(" ,", ",")
    assert byte_vocab(Cleaned()) is None

    class SaysCleanedDoesNot(Cleaned):  # transformers 5 on a BPE tokenizer from a GGUF
        decode = tok.decode
    assert byte_vocab(SaysCleanedDoesNot()) is not None

    from tokenizers import Tokenizer, decoders
    other = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    other.decoder = decoders.Metaspace()

    class SentencePieceLike:
        backend_tokenizer = other
    assert byte_vocab(SentencePieceLike()) is None


def _with_decoder(tok, decoder):
    from tokenizers import Tokenizer
    other = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    other.decoder = decoder

    class Wrapped:
        backend_tokenizer = other
    return Wrapped(), other


def test_a_sequence_ending_in_byte_level_that_changes_no_token_is_bytes(tok):
    """transformers 5.17 (the H200 image) builds SmolLM2's decoder from the GGUF as
    Sequence[ByteFallback, Fuse, Replace("\u2581", " "), ByteLevel]; the byte path must
    take it and still equal its decode."""
    from tokenizers import decoders
    wrapped, other = _with_decoder(tok, decoders.Sequence([
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "),
        decoders.ByteLevel()]))
    vocab, rng = byte_vocab(wrapped), random.Random(11)
    assert vocab is not None
    V = other.get_vocab_size()
    for i in range(V):
        assert run(vocab, [i], False)[0][0] + run(vocab, [i], False)[1] \
            == other.decode([i], skip_special_tokens=False), i
    for _ in range(500):
        ids = [rng.randrange(V) if rng.random() < 0.5 else rng.randrange(0, 600)
               for _ in range(rng.randrange(1, 30))]
        steps, tail = run(vocab, ids, True)
        assert "".join(steps) + tail == other.decode(ids, skip_special_tokens=True), ids


def test_a_sequence_step_that_changes_tokens_is_left_to_the_window(tok):
    from tokenizers import decoders
    # "\u0120" (GPT-2's stand-in for a space) is in thousands of tokens: not bytes any more
    wrapped, _ = _with_decoder(tok, decoders.Sequence([
        decoders.Replace("\u0120", "_"), decoders.ByteLevel()]))
    assert byte_vocab(wrapped) is None
    wrapped, _ = _with_decoder(tok, decoders.Sequence([
        decoders.ByteLevel(), decoders.Strip(" ", 1, 0)]))  # ByteLevel not last
    assert byte_vocab(wrapped) is None
