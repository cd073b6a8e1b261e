from pdmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("room", "decode_worker_id", "decode_address", "token_ids", "sampling_params")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    room: int
    decode_worker_id: str
    decode_address: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    def __init__(self, room: _Optional[int] = ..., decode_worker_id: _Optional[str] = ..., decode_address: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class PrefillTimings(_message.Message):
    __slots__ = ("queue_s", "prefill_s", "wait_transfer_s", "transfer_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    prefill_s: float
    wait_transfer_s: float
    transfer_s: float
    def __init__(self, queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., wait_transfer_s: _Optional[float] = ..., transfer_s: _Optional[float] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("room", "timings", "cached_tokens")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    room: int
    timings: PrefillTimings
    cached_tokens: int
    def __init__(self, room: _Optional[int] = ..., timings: _Optional[_Union[PrefillTimings, _Mapping]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("room", "decode_worker_id", "dst_session_id", "dst_kv_base_address", "dst_page_ids", "model_id", "dtype", "page_size", "num_layers", "num_kv_heads", "head_dim", "bytes_per_page", "dst_host_id", "dst_local_endpoints", "dst_cached_pages", "dst_ranks")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DST_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DST_KV_BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DST_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_PAGE_FIELD_NUMBER: _ClassVar[int]
    DST_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DST_LOCAL_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    DST_CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    DST_RANKS_FIELD_NUMBER: _ClassVar[int]
    room: int
    decode_worker_id: str
    dst_session_id: str
    dst_kv_base_address: int
    dst_page_ids: _containers.RepeatedScalarFieldContainer[int]
    model_id: str
    dtype: str
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bytes_per_page: int
    dst_host_id: str
    dst_local_endpoints: _containers.RepeatedScalarFieldContainer[str]
    dst_cached_pages: int
    dst_ranks: _containers.RepeatedCompositeFieldContainer[_common_pb2.KvRank]
    def __init__(self, room: _Optional[int] = ..., decode_worker_id: _Optional[str] = ..., dst_session_id: _Optional[str] = ..., dst_kv_base_address: _Optional[int] = ..., dst_page_ids: _Optional[_Iterable[int]] = ..., model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., page_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., bytes_per_page: _Optional[int] = ..., dst_host_id: _Optional[str] = ..., dst_local_endpoints: _Optional[_Iterable[str]] = ..., dst_cached_pages: _Optional[int] = ..., dst_ranks: _Optional[_Iterable[_Union[_common_pb2.KvRank, _Mapping]]] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "cached_tokens", "bytes_moved", "descriptor_count", "transfer_s", "transfer_path", "kv_checksum", "kv_checksum_algo")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_PATH_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_ALGO_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: _common_pb2.TokenLogprob
    cached_tokens: int
    bytes_moved: int
    descriptor_count: int
    transfer_s: float
    transfer_path: str
    kv_checksum: int
    kv_checksum_algo: str
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., descriptor_count: _Optional[int] = ..., transfer_s: _Optional[float] = ..., transfer_path: _Optional[str] = ..., kv_checksum: _Optional[int] = ..., kv_checksum_algo: _Optional[str] = ...) -> None: ...

class PrefillAbortRequest(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: int
    def __init__(self, room: _Optional[int] = ...) -> None: ...

class PrefillAbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class PrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStatsResponse(_message.Message):
    __slots__ = ("total_pages", "free_pages", "rooms", "transferred_requests", "failed_requests")
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    total_pages: int
    free_pages: int
    rooms: int
    transferred_requests: int
    failed_requests: int
    def __init__(self, total_pages: _Optional[int] = ..., free_pages: _Optional[int] = ..., rooms: _Optional[int] = ..., transferred_requests: _Optional[int] = ..., failed_requests: _Optional[int] = ...) -> None: ...
