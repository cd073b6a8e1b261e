"""Request.tokens(start, end): a chunk of the request's tokens (prompt, then sampled
outputs) as ModelRunner._flatten and the TP driver take them, equal to token_at one by one."""
from __future__ import annotations

from hypothesis import given, strategies as st

from pdmesh.runtime.request import Request
from pdmesh.runtime.sampling_params import SamplingParams


@given(prompt=st.lists(st.integers(0, 99), min_size=1, max_size=20),
       outputs=st.lists(st.integers(100, 199), max_size=10), data=st.data())
def test_tokens_equal_token_at(prompt, outputs, data):
    r = Request("r", prompt, SamplingParams(), output_ids=list(outputs))
    total = len(prompt) + len(outputs)
    start = data.draw(st.integers(0, total))
    end = data.draw(st.integers(start, total))
    assert r.tokens(start, end) == [r.token_at(i) for i in range(start, end)]
