from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvWriteAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_WRITE_ACTION_UNSPECIFIED: _ClassVar[KvWriteAction]
    KV_WRITE_ACTION_DELAY: _ClassVar[KvWriteAction]
    KV_WRITE_ACTION_FAIL: _ClassVar[KvWriteAction]
    KV_WRITE_ACTION_CORRUPT: _ClassVar[KvWriteAction]

class HeartbeatAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEARTBEAT_ACTION_UNSPECIFIED: _ClassVar[HeartbeatAction]
    HEARTBEAT_ACTION_STALL: _ClassVar[HeartbeatAction]
    HEARTBEAT_ACTION_DROP: _ClassVar[HeartbeatAction]

class RpcAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RPC_ACTION_UNSPECIFIED: _ClassVar[RpcAction]
    RPC_ACTION_DELAY: _ClassVar[RpcAction]
    RPC_ACTION_FAIL: _ClassVar[RpcAction]
KV_WRITE_ACTION_UNSPECIFIED: KvWriteAction
KV_WRITE_ACTION_DELAY: KvWriteAction
KV_WRITE_ACTION_FAIL: KvWriteAction
KV_WRITE_ACTION_CORRUPT: KvWriteAction
HEARTBEAT_ACTION_UNSPECIFIED: HeartbeatAction
HEARTBEAT_ACTION_STALL: HeartbeatAction
HEARTBEAT_ACTION_DROP: HeartbeatAction
RPC_ACTION_UNSPECIFIED: RpcAction
RPC_ACTION_DELAY: RpcAction
RPC_ACTION_FAIL: RpcAction

class ChaosFault(_message.Message):
    __slots__ = ("kv_write", "heartbeat", "rpc", "engine")
    KV_WRITE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RPC_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    kv_write: KvWriteFault
    heartbeat: HeartbeatFault
    rpc: RpcFault
    engine: EngineFault
    def __init__(self, kv_write: _Optional[_Union[KvWriteFault, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatFault, _Mapping]] = ..., rpc: _Optional[_Union[RpcFault, _Mapping]] = ..., engine: _Optional[_Union[EngineFault, _Mapping]] = ...) -> None: ...

class KvWriteFault(_message.Message):
    __slots__ = ("action", "count", "delay_s")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    action: KvWriteAction
    count: int
    delay_s: float
    def __init__(self, action: _Optional[_Union[KvWriteAction, str]] = ..., count: _Optional[int] = ..., delay_s: _Optional[float] = ...) -> None: ...

class HeartbeatFault(_message.Message):
    __slots__ = ("action", "duration_s")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    action: HeartbeatAction
    duration_s: float
    def __init__(self, action: _Optional[_Union[HeartbeatAction, str]] = ..., duration_s: _Optional[float] = ...) -> None: ...

class RpcFault(_message.Message):
    __slots__ = ("method", "action", "count", "delay_s", "code")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELAY_S_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    method: str
    action: RpcAction
    count: int
    delay_s: float
    code: str
    def __init__(self, method: _Optional[str] = ..., action: _Optional[_Union[RpcAction, str]] = ..., count: _Optional[int] = ..., delay_s: _Optional[float] = ..., code: _Optional[str] = ...) -> None: ...

class EngineFault(_message.Message):
    __slots__ = ("step_sleep_s", "duration_s", "fail_step")
    STEP_SLEEP_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FAIL_STEP_FIELD_NUMBER: _ClassVar[int]
    step_sleep_s: float
    duration_s: float
    fail_step: bool
    def __init__(self, step_sleep_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., fail_step: _Optional[bool] = ...) -> None: ...

class ChaosClearRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChaosStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChaosState(_message.Message):
    __slots__ = ("role", "kv_writes_armed", "kv_write_action", "heartbeat_fault_left_s", "rpcs_armed", "engine_fault_left_s", "fired", "pid")
    class RpcsArmedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    KV_WRITES_ARMED_FIELD_NUMBER: _ClassVar[int]
    KV_WRITE_ACTION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FAULT_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    RPCS_ARMED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FAULT_LEFT_S_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    role: str
    kv_writes_armed: int
    kv_write_action: str
    heartbeat_fault_left_s: float
    rpcs_armed: _containers.ScalarMap[str, int]
    engine_fault_left_s: float
    fired: int
    pid: int
    def __init__(self, role: _Optional[str] = ..., kv_writes_armed: _Optional[int] = ..., kv_write_action: _Optional[str] = ..., heartbeat_fault_left_s: _Optional[float] = ..., rpcs_armed: _Optional[_Mapping[str, int]] = ..., engine_fault_left_s: _Optional[float] = ..., fired: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...
