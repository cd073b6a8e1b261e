"""pdmesh.worker.convert: proto <-> runtime SamplingParams and logprobs."""
from __future__ import annotations

import pytest

from pdmesh.runtime.sampler import SampledToken
from pdmesh.runtime.sampling_params import SamplingParams
from pdmesh.v1 import common_pb2 as cpb
from pdmesh.worker.convert import (finish_reason_to_proto, logprob_from_proto, logprob_to_proto,
                                   sampling_from_proto, sampling_to_proto, validate_token_ids)


def test_unset_fields_take_runtime_defaults():
    assert sampling_from_proto(cpb.SamplingParams()) == SamplingParams()


def test_round_trip():
    p = SamplingParams(max_tokens=7, min_tokens=2, temperature=0.5, top_k=5, top_p=0.9,
                       min_p=0.1, seed=3, repetition_penalty=1.1, frequency_penalty=0.5,
                       presence_penalty=-0.5, stop=("x", "yz"), stop_token_ids=(4,),
                       ignore_eos=True, logprobs=2, skip_special_tokens=False)
    assert sampling_from_proto(sampling_to_proto(p)) == p


@pytest.mark.parametrize("msg, field", [
    (cpb.SamplingParams(temperature=-1), "temperature"),
    (cpb.SamplingParams(top_p=0), "top_p"),
    (cpb.SamplingParams(max_tokens=0), "max_tokens"),
    (cpb.SamplingParams(logprobs=21), "logprobs"),
    (cpb.SamplingParams(frequency_penalty=3), "frequency_penalty"),
])
def test_invalid_values_name_the_field(msg, field):
    with pytest.raises(ValueError, match=field):
        sampling_from_proto(msg)


def test_logprob_and_finish_reason():
    tok = SampledToken(5, -0.25, [(5, -0.25), (9, -2.0)])
    assert logprob_from_proto(logprob_to_proto(tok)) == tok
    assert finish_reason_to_proto("length") == cpb.FINISH_REASON_LENGTH
    assert finish_reason_to_proto(None) == cpb.FINISH_REASON_UNSPECIFIED


def test_validate_token_ids():
    assert validate_token_ids([1, 2], 10) == [1, 2]
    with pytest.raises(ValueError, match="empty"):
        validate_token_ids([], 10)
    with pytest.raises(ValueError, match="out of range"):
        validate_token_ids([3, 10], 10)
