"""The dequantised-weights cache of GGUF models (pdmesh.runtime.weights_cache)."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pdmesh.runtime import gguf_loader, weights_cache
from pdmesh.runtime.gguf_loader import read_gguf
from pdmesh.runtime.loader import load_model, load_weights_and_config, resolve_model_path
from tiny_models import tiny_chatml_tokenizer, write_tiny_gguf, write_tiny_hf_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache dir; returns its weights folder."""
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PDMESH_WEIGHTS_CACHE", raising=False)
    return tmp_path / "cache" / "weights"


@pytest.fixture
def parses(monkeypatch):
    """Counts GGUF parses (gguf_loader.open_gguf calls) from here on."""
    calls = []
    real = gguf_loader.open_gguf

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(gguf_loader, "open_gguf", spy)
    return calls


@pytest.fixture
def tiny_gguf(tmp_path):
    ref = write_tiny_hf_model(tmp_path / "hf", "llama", seed=5, vocab_size=260, with_tokenizer=False)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, ref, Q.Q4_1, tokenizer=tiny_chatml_tokenizer())
    return path


def ours(caplog) -> list:
    return [r for r in caplog.records if r.name == weights_cache.__name__]


def assert_identical(a: tuple, b: tuple) -> None:
    (ca, wa), (cb, wb) = a, b
    assert ca == cb
    assert list(wa) == list(wb)  # same names, same order
    for name in wa:
        assert wa[name].dtype == wb[name].dtype, name
        assert wa[name].shape == wb[name].shape, name
        assert torch.equal(wa[name], wb[name]), name


def test_cached_load_is_identical_and_skips_the_parse(cache, parses, tiny_gguf):
    fresh = read_gguf(tiny_gguf)
    assert len(parses) == 1
    first = load_weights_and_config(tiny_gguf)  # miss: parses and writes the cache
    assert len(parses) == 2
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]
    assert weights_cache.cache_path(tiny_gguf).stat().st_mode & 0o777 == 0o644  # shareable
    second = load_weights_and_config(tiny_gguf)
    assert len(parses) == 2  # hit: no parse
    assert_identical(second, fresh)
    assert_identical(first, fresh)
    m = load_model(tiny_gguf)  # load_model goes through the same cache
    assert len(parses) == 2
    assert_identical((m.config, m.weights), fresh)
    assert m.tokenizer.encode("hi") == [256]


def test_default_model_cached_is_bit_identical(cache, parses):
    """The real default model (Q4_1, tied embeddings, 538 MB float32)."""
    path = resolve_model_path("default")
    fresh = read_gguf(path)
    load_weights_and_config(path)
    cached = load_weights_and_config(path)
    assert len(parses) == 2  # read_gguf + the miss; the hit parsed nothing
    assert_identical(cached, fresh)
    assert all(w.dtype == torch.float32 for w in cached[1].values())


def test_key_follows_size_mtime_and_format_version(cache, parses, tiny_gguf, monkeypatch):
    key = weights_cache.cache_key(tiny_gguf)
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_cache.cache_key(tiny_gguf) != key
    key_mtime = weights_cache.cache_key(tiny_gguf)
    with open(tiny_gguf, "ab") as f:  # size changes
        f.write(b"\0" * 32)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same mtime as before
    assert weights_cache.cache_key(tiny_gguf) not in (key, key_mtime)
    key_size = weights_cache.cache_key(tiny_gguf)
    monkeypatch.setattr(weights_cache, "FORMAT_VERSION", weights_cache.FORMAT_VERSION + 1)
    assert weights_cache.cache_key(tiny_gguf) != key_size
    # the cache file is per path: a changed file is parsed again and overwrites it
    assert weights_cache.cache_path(tiny_gguf) == weights_cache.cache_path(tiny_gguf.parent / "." / "m.gguf")


def test_changed_file_is_parsed_again_into_the_same_file(cache, parses, tiny_gguf):
    load_weights_and_config(tiny_gguf)
    load_weights_and_config(tiny_gguf)
    assert len(parses) == 1
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert_identical(load_weights_and_config(tiny_gguf), read_gguf(tiny_gguf))
    assert len(parses) == 3  # the changed file's miss + read_gguf
    load_weights_and_config(tiny_gguf)
    assert len(parses) == 3
    assert len(list(cache.iterdir())) == 1  # one file per model


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header_only"])
def test_corrupt_cache_is_ignored_and_rebuilt(cache, parses, tiny_gguf, damage, caplog):
    fresh = load_weights_and_config(tiny_gguf)
    file = weights_cache.cache_path(tiny_gguf)
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) * 2 // 3], "garbage": os.urandom(len(data)),
                      "empty": b"", "header_only": data[:8 + int.from_bytes(data[:8], "little")]}[damage])
    with caplog.at_level(logging.WARNING, logger=weights_cache.__name__):
        again = load_weights_and_config(tiny_gguf)
    assert len(parses) == 2  # parsed again
    assert_identical(again, fresh)
    assert "unreadable" in caplog.text and len(ours(caplog)) == 1
    assert file.stat().st_size == len(data)  # rebuilt (metadata order may differ)
    assert_identical(load_weights_and_config(tiny_gguf), fresh)
    assert len(parses) == 2


def test_unwritable_cache_dir_still_loads(tmp_path, monkeypatch, parses, tiny_gguf, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache dir should be")
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger=weights_cache.__name__):
        got = load_weights_and_config(tiny_gguf)
    assert_identical(got, read_gguf(tiny_gguf))
    assert "not written" in caplog.text and len(ours(caplog)) == 1


def test_failed_write_leaves_no_temp_file(cache, parses, tiny_gguf, monkeypatch, caplog):
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with caplog.at_level(logging.WARNING, logger=weights_cache.__name__):
        assert_identical(load_weights_and_config(tiny_gguf), read_gguf(tiny_gguf))
    assert "No space left" in caplog.text
    assert list(cache.iterdir()) == []


def test_switch_off_writes_nothing(cache, parses, tiny_gguf, monkeypatch):
    monkeypatch.setenv("PDMESH_WEIGHTS_CACHE", "0")
    load_weights_and_config(tiny_gguf)
    load_weights_and_config(tiny_gguf)
    assert len(parses) == 2
    assert not cache.exists()


def test_prunes_entries_of_deleted_models_and_stale_temp_files(cache, parses, tmp_path, tiny_gguf):
    other = tmp_path / "other.gguf"
    shutil.copy(tiny_gguf, other)
    load_weights_and_config(other)
    stale = cache / ".abc.tmp"
    stale.write_bytes(b"left by a writer that died")
    os.utime(stale, (1, 1))
    other.unlink()
    load_weights_and_config(tiny_gguf)
    assert list(cache.iterdir()) == [weights_cache.cache_path(tiny_gguf)]


def test_config_roundtrip_keeps_tuples_and_rope_scaling():
    from pdmesh.config import ModelConfig, RopeScaling

    c = ModelConfig(arch="llama", vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-5 / 3,
                    rope_scaling=RopeScaling(factor=32.0), bos_token_id=1, eos_token_ids=(2, 3))
    import json
    assert weights_cache._config_from_json(json.dumps(dataclasses.asdict(c))) == c


def test_concurrent_first_loads(cache, parses, tiny_gguf):
    """Workers starting together: each may parse and write, renames are atomic, all
    load the same tensors, and one complete cache file is left."""
    import subprocess
    import sys

    code = ("import sys, torch; from pdmesh.runtime.loader import load_weights_and_config; "
            "c, w = load_weights_and_config(sys.argv[1]); "
            "print(sum(float(t.double().sum()) for t in w.values()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_gguf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    sums = {float(out.strip()) for out, _ in outs}
    expected = sum(float(t.double().sum()) for t in read_gguf(tiny_gguf)[1].values())
    assert sums == {expected}
    assert list(cache.iterdir()) == [weights_cache.cache_path(tiny_gguf)]
    n = len(parses)
    assert_identical(load_weights_and_config(tiny_gguf), read_gguf(tiny_gguf))
    assert len(parses) == n + 1  # the hit parsed nothing; read_gguf did


def test_cached_config_reads_the_header_only_and_only_a_current_entry(cache, parses, tiny_gguf,
                                                                     caplog):
    """The gateway's model config without a GGUF parse: what a worker's load left."""
    from pdmesh.services.gateway.model_info import load_model_info

    assert weights_cache.cached_config(tiny_gguf) is None  # nothing cached yet
    config, _ = load_weights_and_config(tiny_gguf)
    parses.clear()
    assert weights_cache.cached_config(tiny_gguf) == config
    info = load_model_info(str(tiny_gguf))
    assert parses == [] and info.vocab_size == config.vocab_size
    assert info.max_model_len == config.max_position_embeddings
    st = tiny_gguf.stat()  # a changed file: the entry is stale, the gateway parses it
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_cache.cached_config(tiny_gguf) is None
    load_model_info(str(tiny_gguf))
    assert len(parses) == 1
    load_weights_and_config(tiny_gguf)  # rewritten for the new mtime
    file = weights_cache.cache_path(tiny_gguf)
    file.write_bytes(file.read_bytes()[:12])  # truncated header: None and one warning
    caplog.set_level(logging.WARNING, logger=weights_cache.__name__)
    assert weights_cache.cached_config(tiny_gguf) is None
    assert any("header unreadable" in r.getMessage() for r in ours(caplog))


def test_the_gateways_model_info_imports_no_torch(cache, tiny_gguf):
    """load_model_info in a fresh interpreter, the caches warm: torch never imported
    (importing it was 1.3 s of a gateway's start on the dev CPU; with the GGUF parse and
    AutoTokenizer, 5.0 s in all, now 1.0)."""
    import subprocess
    import sys

    load_model(tiny_gguf)  # as a worker does: weights and the tokenizer's folder cached
    code = ("import sys; from pdmesh.services.gateway.model_info import load_model_info; "
            f"load_model_info({str(tiny_gguf)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
