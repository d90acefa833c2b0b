import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SYSTEM: _ClassVar[Role]
    ROLE_USER: _ClassVar[Role]
    ROLE_ASSISTANT: _ClassVar[Role]
    ROLE_TOOL: _ClassVar[Role]

class DeliveryMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_MODE_UNSPECIFIED: _ClassVar[DeliveryMode]
    DELIVERY_MODE_AUTO: _ClassVar[DeliveryMode]
    DELIVERY_MODE_STREAM: _ClassVar[DeliveryMode]
    DELIVERY_MODE_BUFFERED: _ClassVar[DeliveryMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_POLICY_BLOCKED: _ClassVar[FinishReason]
    FINISH_REASON_TOOL_CALLS: _ClassVar[FinishReason]
    FINISH_REASON_INVALID_OUTPUT: _ClassVar[FinishReason]

class ToolChoiceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_CHOICE_MODE_UNSPECIFIED: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_AUTO: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_NONE: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_REQUIRED: _ClassVar[ToolChoiceMode]

class ResponseFormatType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_FORMAT_TYPE_UNSPECIFIED: _ClassVar[ResponseFormatType]
    RESPONSE_FORMAT_TYPE_TEXT: _ClassVar[ResponseFormatType]
    RESPONSE_FORMAT_TYPE_JSON_OBJECT: _ClassVar[ResponseFormatType]
    RESPONSE_FORMAT_TYPE_JSON_SCHEMA: _ClassVar[ResponseFormatType]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_ALLOWED: _ClassVar[Verdict]
    VERDICT_REDACTED: _ClassVar[Verdict]
    VERDICT_BLOCKED: _ClassVar[Verdict]

class VerificationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFICATION_STATUS_UNSPECIFIED: _ClassVar[VerificationStatus]
    VERIFICATION_STATUS_VERIFIED: _ClassVar[VerificationStatus]
    VERIFICATION_STATUS_DIVERGED: _ClassVar[VerificationStatus]

class ServingPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_PATH_UNSPECIFIED: _ClassVar[ServingPath]
    SERVING_PATH_STREAMING: _ClassVar[ServingPath]
    SERVING_PATH_NON_STREAMING: _ClassVar[ServingPath]

class GovernanceOperator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GOVERNANCE_OPERATOR_UNSPECIFIED: _ClassVar[GovernanceOperator]
    GOVERNANCE_OPERATOR_MASK: _ClassVar[GovernanceOperator]
    GOVERNANCE_OPERATOR_REPLACE: _ClassVar[GovernanceOperator]
    GOVERNANCE_OPERATOR_HASH: _ClassVar[GovernanceOperator]
    GOVERNANCE_OPERATOR_BLOCK: _ClassVar[GovernanceOperator]
    GOVERNANCE_OPERATOR_FLAG: _ClassVar[GovernanceOperator]

class CheckOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECK_OUTCOME_UNSPECIFIED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_PASSED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_FAILED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_ESCALATED: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_ERROR: _ClassVar[CheckOutcome]
    CHECK_OUTCOME_TIMED_OUT: _ClassVar[CheckOutcome]

class ReviewState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_STATE_UNSPECIFIED: _ClassVar[ReviewState]
    REVIEW_STATE_PENDING: _ClassVar[ReviewState]
    REVIEW_STATE_APPROVED: _ClassVar[ReviewState]
    REVIEW_STATE_REJECTED: _ClassVar[ReviewState]
    REVIEW_STATE_EDITED: _ClassVar[ReviewState]
    REVIEW_STATE_EXPIRED: _ClassVar[ReviewState]
ROLE_UNSPECIFIED: Role
ROLE_SYSTEM: Role
ROLE_USER: Role
ROLE_ASSISTANT: Role
ROLE_TOOL: Role
DELIVERY_MODE_UNSPECIFIED: DeliveryMode
DELIVERY_MODE_AUTO: DeliveryMode
DELIVERY_MODE_STREAM: DeliveryMode
DELIVERY_MODE_BUFFERED: DeliveryMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_POLICY_BLOCKED: FinishReason
FINISH_REASON_TOOL_CALLS: FinishReason
FINISH_REASON_INVALID_OUTPUT: FinishReason
TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode
TOOL_CHOICE_MODE_AUTO: ToolChoiceMode
TOOL_CHOICE_MODE_NONE: ToolChoiceMode
TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode
RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType
RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType
RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType
RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType
VERDICT_UNSPECIFIED: Verdict
VERDICT_ALLOWED: Verdict
VERDICT_REDACTED: Verdict
VERDICT_BLOCKED: Verdict
VERIFICATION_STATUS_UNSPECIFIED: VerificationStatus
VERIFICATION_STATUS_VERIFIED: VerificationStatus
VERIFICATION_STATUS_DIVERGED: VerificationStatus
SERVING_PATH_UNSPECIFIED: ServingPath
SERVING_PATH_STREAMING: ServingPath
SERVING_PATH_NON_STREAMING: ServingPath
GOVERNANCE_OPERATOR_UNSPECIFIED: GovernanceOperator
GOVERNANCE_OPERATOR_MASK: GovernanceOperator
GOVERNANCE_OPERATOR_REPLACE: GovernanceOperator
GOVERNANCE_OPERATOR_HASH: GovernanceOperator
GOVERNANCE_OPERATOR_BLOCK: GovernanceOperator
GOVERNANCE_OPERATOR_FLAG: GovernanceOperator
CHECK_OUTCOME_UNSPECIFIED: CheckOutcome
CHECK_OUTCOME_PASSED: CheckOutcome
CHECK_OUTCOME_FAILED: CheckOutcome
CHECK_OUTCOME_ESCALATED: CheckOutcome
CHECK_OUTCOME_ERROR: CheckOutcome
CHECK_OUTCOME_TIMED_OUT: CheckOutcome
REVIEW_STATE_UNSPECIFIED: ReviewState
REVIEW_STATE_PENDING: ReviewState
REVIEW_STATE_APPROVED: ReviewState
REVIEW_STATE_REJECTED: ReviewState
REVIEW_STATE_EDITED: ReviewState
REVIEW_STATE_EXPIRED: ReviewState

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "tool_calls", "tool_call_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    role: Role
    content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    tool_call_id: str
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

class Tool(_message.Message):
    __slots__ = ("name", "description", "parameters", "strict")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _struct_pb2.Struct
    strict: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., strict: _Optional[bool] = ...) -> None: ...

class ToolChoice(_message.Message):
    __slots__ = ("mode", "function_name")
    MODE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    mode: ToolChoiceMode
    function_name: str
    def __init__(self, mode: _Optional[_Union[ToolChoiceMode, str]] = ..., function_name: _Optional[str] = ...) -> None: ...

class ResponseFormat(_message.Message):
    __slots__ = ("type", "schema_name", "json_schema", "strict")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_NAME_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    type: ResponseFormatType
    schema_name: str
    json_schema: _struct_pb2.Struct
    strict: bool
    def __init__(self, type: _Optional[_Union[ResponseFormatType, str]] = ..., schema_name: _Optional[str] = ..., json_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., strict: _Optional[bool] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "stop", "seed")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class Chunking(_message.Message):
    __slots__ = ("max_tokens_per_chunk", "max_delay")
    MAX_TOKENS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_FIELD_NUMBER: _ClassVar[int]
    max_tokens_per_chunk: int
    max_delay: _duration_pb2.Duration
    def __init__(self, max_tokens_per_chunk: _Optional[int] = ..., max_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ResumeFrom(_message.Message):
    __slots__ = ("response_id", "after_sequence")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    after_sequence: int
    def __init__(self, response_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class GovernanceAction(_message.Message):
    __slots__ = ("rule_id", "entity_type", "operator", "start", "end")
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    ENTITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    rule_id: str
    entity_type: str
    operator: GovernanceOperator
    start: int
    end: int
    def __init__(self, rule_id: _Optional[str] = ..., entity_type: _Optional[str] = ..., operator: _Optional[_Union[GovernanceOperator, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Governance(_message.Message):
    __slots__ = ("policy_id", "policy_version", "actions", "model", "model_version")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    policy_version: str
    actions: _containers.RepeatedCompositeFieldContainer[GovernanceAction]
    model: str
    model_version: str
    def __init__(self, policy_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[GovernanceAction, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments", "arguments_offset")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments: str
    arguments_offset: int
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ..., arguments_offset: _Optional[int] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("response_id", "sequence", "text", "text_offset", "token_count", "governance", "emitted_at", "tool_call")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    GOVERNANCE_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    sequence: int
    text: str
    text_offset: int
    token_count: int
    governance: Governance
    emitted_at: _timestamp_pb2.Timestamp
    tool_call: ToolCallDelta
    def __init__(self, response_id: _Optional[str] = ..., sequence: _Optional[int] = ..., text: _Optional[str] = ..., text_offset: _Optional[int] = ..., token_count: _Optional[int] = ..., governance: _Optional[_Union[Governance, _Mapping]] = ..., emitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCallDelta, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("response_id", "emitted_at")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    emitted_at: _timestamp_pb2.Timestamp
    def __init__(self, response_id: _Optional[str] = ..., emitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckViolation(_message.Message):
    __slots__ = ("code", "message", "json_pointer", "start", "end")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JSON_POINTER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    json_pointer: str
    start: int
    end: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., json_pointer: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class VerificationCheck(_message.Message):
    __slots__ = ("name", "outcome", "violations", "latency")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    outcome: CheckOutcome
    violations: _containers.RepeatedCompositeFieldContainer[CheckViolation]
    latency: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., outcome: _Optional[_Union[CheckOutcome, str]] = ..., violations: _Optional[_Iterable[_Union[CheckViolation, _Mapping]]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class ReviewRef(_message.Message):
    __slots__ = ("review_id", "state", "held")
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    state: ReviewState
    held: bool
    def __init__(self, review_id: _Optional[str] = ..., state: _Optional[_Union[ReviewState, str]] = ..., held: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class Verification(_message.Message):
    __slots__ = ("status", "streamed_sha256", "retract_from_sequence", "checks", "checks_passed")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STREAMED_SHA256_FIELD_NUMBER: _ClassVar[int]
    RETRACT_FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_PASSED_FIELD_NUMBER: _ClassVar[int]
    status: VerificationStatus
    streamed_sha256: str
    retract_from_sequence: int
    checks: _containers.RepeatedCompositeFieldContainer[VerificationCheck]
    checks_passed: bool
    def __init__(self, status: _Optional[_Union[VerificationStatus, str]] = ..., streamed_sha256: _Optional[str] = ..., retract_from_sequence: _Optional[int] = ..., checks: _Optional[_Iterable[_Union[VerificationCheck, _Mapping]]] = ..., checks_passed: _Optional[bool] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("time_to_first_token", "total")
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    time_to_first_token: _duration_pb2.Duration
    total: _duration_pb2.Duration
    def __init__(self, time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., total: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Serving(_message.Message):
    __slots__ = ("backend", "path", "attempts")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    path: ServingPath
    attempts: int
    def __init__(self, backend: _Optional[str] = ..., path: _Optional[_Union[ServingPath, str]] = ..., attempts: _Optional[int] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("response_id", "final_text", "final_sha256", "chunk_count", "last_sequence", "finish_reason", "usage", "verdict", "review_required", "verification", "timing", "model", "model_version", "policy_id", "policy_version", "trace_id", "delivery_mode", "serving", "request_id", "actions", "review", "tool_calls")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REVIEW_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_MODE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    final_text: str
    final_sha256: str
    chunk_count: int
    last_sequence: int
    finish_reason: FinishReason
    usage: Usage
    verdict: Verdict
    review_required: bool
    verification: Verification
    timing: Timing
    model: str
    model_version: str
    policy_id: str
    policy_version: str
    trace_id: str
    delivery_mode: DeliveryMode
    serving: Serving
    request_id: str
    actions: _containers.RepeatedCompositeFieldContainer[GovernanceAction]
    review: ReviewRef
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    def __init__(self, response_id: _Optional[str] = ..., final_text: _Optional[str] = ..., final_sha256: _Optional[str] = ..., chunk_count: _Optional[int] = ..., last_sequence: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., review_required: _Optional[bool] = ..., verification: _Optional[_Union[Verification, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., policy_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., trace_id: _Optional[str] = ..., delivery_mode: _Optional[_Union[DeliveryMode, str]] = ..., serving: _Optional[_Union[Serving, _Mapping]] = ..., request_id: _Optional[str] = ..., actions: _Optional[_Iterable[_Union[GovernanceAction, _Mapping]]] = ..., review: _Optional[_Union[ReviewRef, _Mapping]] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ...) -> None: ...

class RespondRequest(_message.Message):
    __slots__ = ("request_id", "model", "messages", "params", "labels", "tools", "tool_choice", "response_format")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    params: GenerationParams
    labels: _containers.ScalarMap[str, str]
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    tool_choice: ToolChoice
    response_format: ResponseFormat
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., tool_choice: _Optional[_Union[ToolChoice, _Mapping]] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ...) -> None: ...

class RespondResponse(_message.Message):
    __slots__ = ("completed",)
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    completed: Completed
    def __init__(self, completed: _Optional[_Union[Completed, _Mapping]] = ...) -> None: ...

class StreamRespondRequest(_message.Message):
    __slots__ = ("request_id", "model", "messages", "params", "labels", "delivery_mode", "chunking", "resume", "omit_final_text", "resumable", "tools", "tool_choice", "response_format")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_MODE_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    OMIT_FINAL_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESUMABLE_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    params: GenerationParams
    labels: _containers.ScalarMap[str, str]
    delivery_mode: DeliveryMode
    chunking: Chunking
    resume: ResumeFrom
    omit_final_text: bool
    resumable: bool
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    tool_choice: ToolChoice
    response_format: ResponseFormat
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., delivery_mode: _Optional[_Union[DeliveryMode, str]] = ..., chunking: _Optional[_Union[Chunking, _Mapping]] = ..., resume: _Optional[_Union[ResumeFrom, _Mapping]] = ..., omit_final_text: _Optional[bool] = ..., resumable: _Optional[bool] = ..., tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., tool_choice: _Optional[_Union[ToolChoice, _Mapping]] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("response_id",)
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    def __init__(self, response_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("response_id", "last_sequence", "was_running")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    last_sequence: int
    was_running: bool
    def __init__(self, response_id: _Optional[str] = ..., last_sequence: _Optional[int] = ..., was_running: _Optional[bool] = ...) -> None: ...

class StreamRespondResponse(_message.Message):
    __slots__ = ("chunk", "completed", "heartbeat")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    completed: Completed
    heartbeat: Heartbeat
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...
