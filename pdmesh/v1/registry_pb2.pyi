from pdmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_COLOCATED: _ClassVar[WorkerRole]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_COLOCATED: WorkerRole

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "page_size", "num_kv_heads", "head_dim", "dtype", "bytes_per_page", "num_pages", "layout", "tp_size", "ranks")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_PAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    bytes_per_page: int
    num_pages: int
    layout: str
    tp_size: int
    ranks: _containers.RepeatedCompositeFieldContainer[_common_pb2.KvRank]
    def __init__(self, num_layers: _Optional[int] = ..., page_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., bytes_per_page: _Optional[int] = ..., num_pages: _Optional[int] = ..., layout: _Optional[str] = ..., tp_size: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[_common_pb2.KvRank, _Mapping]]] = ...) -> None: ...

class TransferEndpoint(_message.Message):
    __slots__ = ("session_id", "kv_base_address", "protocol", "host_id", "local_endpoints")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kv_base_address: int
    protocol: str
    host_id: str
    local_endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., kv_base_address: _Optional[int] = ..., protocol: _Optional[str] = ..., host_id: _Optional[str] = ..., local_endpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class KvReuse(_message.Message):
    __slots__ = ("prefix_cache", "adopted_kv")
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_KV_FIELD_NUMBER: _ClassVar[int]
    prefix_cache: bool
    adopted_kv: bool
    def __init__(self, prefix_cache: _Optional[bool] = ..., adopted_kv: _Optional[bool] = ...) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_running_requests", "num_pages")
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    max_running_requests: int
    num_pages: int
    def __init__(self, max_running_requests: _Optional[int] = ..., num_pages: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("running", "queued", "free_kv_pages", "queued_prefill_tokens")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_PAGES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    free_kv_pages: int
    queued_prefill_tokens: int
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., free_kv_pages: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "model_id", "kv_layout", "transfer", "capacity", "load", "registered_at", "last_heartbeat_at", "kv_reuse")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    KV_REUSE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    model_id: str
    kv_layout: KvLayout
    transfer: TransferEndpoint
    capacity: Capacity
    load: LoadReport
    registered_at: float
    last_heartbeat_at: float
    kv_reuse: KvReuse
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., model_id: _Optional[str] = ..., kv_layout: _Optional[_Union[KvLayout, _Mapping]] = ..., transfer: _Optional[_Union[TransferEndpoint, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., registered_at: _Optional[float] = ..., last_heartbeat_at: _Optional[float] = ..., kv_reuse: _Optional[_Union[KvReuse, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("role", "address", "model_id", "kv_layout", "transfer", "capacity", "load", "kv_reuse")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    KV_REUSE_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    address: str
    model_id: str
    kv_layout: KvLayout
    transfer: TransferEndpoint
    capacity: Capacity
    load: LoadReport
    kv_reuse: KvReuse
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., model_id: _Optional[str] = ..., kv_layout: _Optional[_Union[KvLayout, _Mapping]] = ..., transfer: _Optional[_Union[TransferEndpoint, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., kv_reuse: _Optional[_Union[KvReuse, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_s", "heartbeat_max_failure")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MAX_FAILURE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_s: float
    heartbeat_max_failure: int
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_max_failure: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: LoadReport
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class WorkerEvent(_message.Message):
    __slots__ = ("type", "worker")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WorkerEvent.Type]
        JOINED: _ClassVar[WorkerEvent.Type]
        LEFT: _ClassVar[WorkerEvent.Type]
        EXPIRED: _ClassVar[WorkerEvent.Type]
        UPDATED: _ClassVar[WorkerEvent.Type]
    TYPE_UNSPECIFIED: WorkerEvent.Type
    JOINED: WorkerEvent.Type
    LEFT: WorkerEvent.Type
    EXPIRED: WorkerEvent.Type
    UPDATED: WorkerEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    type: WorkerEvent.Type
    worker: WorkerInfo
    def __init__(self, type: _Optional[_Union[WorkerEvent.Type, str]] = ..., worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...
