from pdmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("room", "prefill_worker_id", "prefill_address", "token_ids", "sampling_params")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    room: int
    prefill_worker_id: str
    prefill_address: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    def __init__(self, room: _Optional[int] = ..., prefill_worker_id: _Optional[str] = ..., prefill_address: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "usage", "stop_reason", "timings", "index")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    stop_reason: str
    timings: DecodeTimings
    index: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., stop_reason: _Optional[str] = ..., timings: _Optional[_Union[DecodeTimings, _Mapping]] = ..., index: _Optional[int] = ...) -> None: ...

class DecodeTimings(_message.Message):
    __slots__ = ("admission_s", "kv_wait_s", "first_step_s")
    ADMISSION_S_FIELD_NUMBER: _ClassVar[int]
    KV_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_S_FIELD_NUMBER: _ClassVar[int]
    admission_s: float
    kv_wait_s: float
    first_step_s: float
    def __init__(self, admission_s: _Optional[float] = ..., kv_wait_s: _Optional[float] = ..., first_step_s: _Optional[float] = ...) -> None: ...

class DecodeAbortRequest(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: int
    def __init__(self, room: _Optional[int] = ...) -> None: ...

class DecodeAbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class SlowDownRequest(_message.Message):
    __slots__ = ("forward_sleep_time",)
    FORWARD_SLEEP_TIME_FIELD_NUMBER: _ClassVar[int]
    forward_sleep_time: float
    def __init__(self, forward_sleep_time: _Optional[float] = ...) -> None: ...

class SlowDownResponse(_message.Message):
    __slots__ = ("forward_sleep_time",)
    FORWARD_SLEEP_TIME_FIELD_NUMBER: _ClassVar[int]
    forward_sleep_time: float
    def __init__(self, forward_sleep_time: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("total_pages", "free_pages", "used_pages", "quarantined_pages", "running", "queued", "forward_sleep_time", "finished_requests")
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    USED_PAGES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_PAGES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SLEEP_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    total_pages: int
    free_pages: int
    used_pages: int
    quarantined_pages: int
    running: int
    queued: int
    forward_sleep_time: float
    finished_requests: int
    def __init__(self, total_pages: _Optional[int] = ..., free_pages: _Optional[int] = ..., used_pages: _Optional[int] = ..., quarantined_pages: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., forward_sleep_time: _Optional[float] = ..., finished_requests: _Optional[int] = ...) -> None: ...
