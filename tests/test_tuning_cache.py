"""Start-up tuning answers are kept on disk: computed once per machine, merged across
processes, and a broken file only means timing again."""
from __future__ import annotations

import json

from pdmesh.runtime import tuning_cache


def test_computed_once_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning_cache, "_memo", None)
    calls = []
    k = tuning_cache.key("gemv", "GPU X", (576, 192), "bf16", 1)

    def compute():
        calls.append(1)
        return [[16, 256, 4, 4, False], 0.01, 0.02]
    assert tuning_cache.cached(k, compute) == [[16, 256, 4, 4, False], 0.01, 0.02]
    assert tuning_cache.cached(k, compute) == [[16, 256, 4, 4, False], 0.01, 0.02]
    monkeypatch.setattr(tuning_cache, "_memo", None)  # a new process
    assert tuning_cache.cached(k, compute)[1] == 0.01
    assert len(calls) == 1
    # another process added its own answer meanwhile: both are kept
    data = json.loads((tmp_path / "tuning.json").read_text())
    (tmp_path / "tuning.json").write_text(json.dumps({**data, "other": [None, 1.0]}))
    tuning_cache.cached(tuning_cache.key("skinny", "GPU X", (49152, 576), 16), lambda: [None, 1.0])
    assert set(json.loads((tmp_path / "tuning.json").read_text())) >= {k, "other"}


def test_corrupt_file_means_timing_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning_cache, "_memo", None)
    (tmp_path / "tuning.json").write_text("{not json")
    assert tuning_cache.cached("k", lambda: [1]) == [1]
    assert json.loads((tmp_path / "tuning.json").read_text()) == {"k": [1]}
