"""A gateway process does a request's first-use work before it serves
(openai_api.warm_up): no client's request pays for it."""
from __future__ import annotations

import logging
import sys

import pytest

from pdmesh.runtime import byte_stream
from pdmesh.runtime.detokenizer import IncrementalDetokenizer
from pdmesh.services.gateway.model_info import ModelInfo, load_model_info
from pdmesh.services.gateway.openai_api import warm_up
from test_detokenizer import GGUF_DIR, GGUF_NAME


@pytest.fixture(scope="module")
def info():
    if not (GGUF_DIR / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} not installed")
    return load_model_info("default")


def test_warm_up_leaves_no_first_use_work_to_a_request(info, monkeypatch):
    # as in a new process: the sampling check's import, the decoder checks' caches
    monkeypatch.delitem(sys.modules, "pdmesh.worker.convert", raising=False)
    scans = []
    real = byte_stream._decodes_bytes
    monkeypatch.setattr(byte_stream, "_decodes_bytes", lambda b: scans.append(b) or real(b))
    monkeypatch.setattr(byte_stream, "_VOCABS", {})
    monkeypatch.setattr(byte_stream, "_VERBATIM", {})
    warm_up(info)
    assert len(scans) == 1  # the decoder's checks ran, once
    assert "pdmesh.worker.convert" in sys.modules
    ids = info.tokenizer.encode("Hello there")
    detok = IncrementalDetokenizer(info.tokenizer, ids)
    assert len(scans) == 1  # a request's detokenizer found them done
    assert detok._bytes is not None  # and the byte path they chose
    assert detok.add(info.tokenizer.encode(" world")[0])[0] == " world"


def test_a_failing_warm_up_is_logged_and_does_not_stop_the_gateway(info, caplog):
    class NoTemplate:  # the completion path still warms up
        def __init__(self, tok):
            self.tok = tok

        def apply_chat_template(self, convo):
            raise RuntimeError("no template engine")

        def __getattr__(self, name):
            return getattr(self.tok, name)

    with caplog.at_level(logging.WARNING):
        warm_up(ModelInfo("m", NoTemplate(info.tokenizer), 128))
    assert "ChatCompletionRequest: no template engine" in caplog.text
    assert "CompletionRequest:" not in caplog.text.replace("ChatCompletionRequest:", "")
