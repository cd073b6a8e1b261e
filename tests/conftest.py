"""Shared fixtures. Tiny-model helpers live in tests/tiny_models.py."""
from __future__ import annotations

import os

import pytest
import torch

# Kernel tests (tests/test_kernels*.py) run Triton's interpreter on CPU. triton.jit reads
# TRITON_INTERPRET when it decorates a kernel, so it is set here, before any test module
# imports pdmesh.kernels; nothing else in the suite uses triton on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Exactness tests compare greedy tokens across batch shapes, retraction, P/D and
    # transformers: in fp32, as DESIGN.md asks. A CPU with native bf16 would default to
    # bf16 (pdmesh.runtime.model_runner.resolve_dtype), whose tokens may flip at near
    # ties when the batch changes; the bf16 path has its own tests (test_cpu_fast_path).
    # Worker processes started by tests inherit this.
    os.environ.setdefault("PDMESH_DTYPE", "float32")

from tiny_models import smollm2_tokenizer


@pytest.fixture(scope="session")
def default_model():
    """The default SmolLM2-135M GGUF, loaded once per session (pdmesh LoadedModel)."""
    from pdmesh.runtime.loader import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """A folder holding the SmolLM2 tokenizer in HF format (tokenizer.json, chat template)."""
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    smollm2_tokenizer().save_pretrained(folder)
    return folder
