from tokenwire.v1 import respond_pb2 as _respond_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValidationOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALIDATION_OUTCOME_UNSPECIFIED: _ClassVar[ValidationOutcome]
    VALIDATION_OUTCOME_PASS: _ClassVar[ValidationOutcome]
    VALIDATION_OUTCOME_FAIL: _ClassVar[ValidationOutcome]
    VALIDATION_OUTCOME_ESCALATE: _ClassVar[ValidationOutcome]
VALIDATION_OUTCOME_UNSPECIFIED: ValidationOutcome
VALIDATION_OUTCOME_PASS: ValidationOutcome
VALIDATION_OUTCOME_FAIL: ValidationOutcome
VALIDATION_OUTCOME_ESCALATE: ValidationOutcome

class ValidateRequest(_message.Message):
    __slots__ = ("response_id", "model", "model_version", "tenant", "labels", "policy_id", "policy_version", "final_text", "tool_calls", "messages")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    model: str
    model_version: str
    tenant: str
    labels: _containers.ScalarMap[str, str]
    policy_id: str
    policy_version: str
    final_text: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_respond_pb2.ToolCall]
    messages: _containers.RepeatedCompositeFieldContainer[_respond_pb2.ChatMessage]
    def __init__(self, response_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., tenant: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., policy_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., final_text: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_respond_pb2.ToolCall, _Mapping]]] = ..., messages: _Optional[_Iterable[_Union[_respond_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class ValidateResponse(_message.Message):
    __slots__ = ("outcome", "violations", "replacement_text", "reason")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    outcome: ValidationOutcome
    violations: _containers.RepeatedCompositeFieldContainer[_respond_pb2.CheckViolation]
    replacement_text: str
    reason: str
    def __init__(self, outcome: _Optional[_Union[ValidationOutcome, str]] = ..., violations: _Optional[_Iterable[_Union[_respond_pb2.CheckViolation, _Mapping]]] = ..., replacement_text: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TextWindow(_message.Message):
    __slots__ = ("offset", "text")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    text: str
    def __init__(self, offset: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class TextEnd(_message.Message):
    __slots__ = ("final_sha256", "diverged", "final_text", "tool_calls")
    FINAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_FIELD_NUMBER: _ClassVar[int]
    FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    final_sha256: str
    diverged: bool
    final_text: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_respond_pb2.ToolCall]
    def __init__(self, final_sha256: _Optional[str] = ..., diverged: _Optional[bool] = ..., final_text: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_respond_pb2.ToolCall, _Mapping]]] = ...) -> None: ...

class ValidateStreamRequest(_message.Message):
    __slots__ = ("start", "window", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: ValidateRequest
    window: TextWindow
    end: TextEnd
    def __init__(self, start: _Optional[_Union[ValidateRequest, _Mapping]] = ..., window: _Optional[_Union[TextWindow, _Mapping]] = ..., end: _Optional[_Union[TextEnd, _Mapping]] = ...) -> None: ...

class ValidateStreamResponse(_message.Message):
    __slots__ = ("outcome", "violations", "replacement_text", "reason", "window_offset")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WINDOW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    outcome: ValidationOutcome
    violations: _containers.RepeatedCompositeFieldContainer[_respond_pb2.CheckViolation]
    replacement_text: str
    reason: str
    window_offset: int
    def __init__(self, outcome: _Optional[_Union[ValidationOutcome, str]] = ..., violations: _Optional[_Iterable[_Union[_respond_pb2.CheckViolation, _Mapping]]] = ..., replacement_text: _Optional[str] = ..., reason: _Optional[str] = ..., window_offset: _Optional[int] = ...) -> None: ...
