"""A cold GGUF load parses the file once: the loader's reader builds the tokenizer too
(pdmesh/runtime/gguf_readers.py); the tokenizer is the one transformers builds alone."""
from __future__ import annotations

import gguf
import pytest

from pdmesh.runtime import gguf_readers
from test_detokenizer import GGUF_DIR, GGUF_NAME


@pytest.fixture
def parses(monkeypatch, tmp_path):
    """Counts GGUF parses; an empty cache (no tokenizer folder, no weights cache)."""
    if not (GGUF_DIR / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} not installed")
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PDMESH_WEIGHTS_CACHE", "0")
    count = []
    real = gguf.gguf_reader.GGUFReader.__init__
    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__",
                        lambda self, *a, **k: count.append(a) or real(self, *a, **k))
    return count


def test_a_cold_load_parses_the_gguf_once_and_builds_the_same_tokenizer(parses):
    from pdmesh.runtime.loader import load_model
    import transformers

    model = load_model("default")
    assert len(parses) == 1
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader  # lent only while building
    assert not gguf_readers._kept  # and dropped after the load
    ref = transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)
    assert len(parses) == 2  # outside a load, transformers parses as usual
    hf = model.tokenizer.hf
    assert hf.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert hf.chat_template == ref.chat_template
    assert hf.all_special_tokens == ref.all_special_tokens


def test_the_gateways_cold_model_info_parses_once(parses):
    from pdmesh.services.gateway.model_info import load_model_info

    info = load_model_info("default")
    assert len(parses) == 1
    assert info.tokenizer.encode("Hello, world!") == [19556, 28, 905, 17]


def test_a_reader_is_lent_only_for_its_own_file(tmp_path):
    with gguf_readers.lent_to_transformers(tmp_path / "x.gguf"):  # nothing kept: no-op
        assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    kept = object()
    with gguf_readers.one_parse():
        gguf_readers._kept[str((tmp_path / "a.gguf").resolve())] = kept
        with gguf_readers.lent_to_transformers(tmp_path / "a.gguf"):
            assert gguf.GGUFReader(tmp_path / "a.gguf") is kept
            with pytest.raises(FileNotFoundError):  # another file: a real parse
                gguf.GGUFReader(tmp_path / "b.gguf")
        assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert not gguf_readers._kept
