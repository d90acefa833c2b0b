import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tokenwire.v1 import respond_pb2 as _respond_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReviewDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_DECISION_UNSPECIFIED: _ClassVar[ReviewDecision]
    REVIEW_DECISION_APPROVE: _ClassVar[ReviewDecision]
    REVIEW_DECISION_REJECT: _ClassVar[ReviewDecision]
    REVIEW_DECISION_EDIT: _ClassVar[ReviewDecision]
REVIEW_DECISION_UNSPECIFIED: ReviewDecision
REVIEW_DECISION_APPROVE: ReviewDecision
REVIEW_DECISION_REJECT: ReviewDecision
REVIEW_DECISION_EDIT: ReviewDecision

class EscalationReason(_message.Message):
    __slots__ = ("rule_id", "description")
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    rule_id: str
    description: str
    def __init__(self, rule_id: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ReviewEvent(_message.Message):
    __slots__ = ("state", "at", "actor", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: _respond_pb2.ReviewState
    at: _timestamp_pb2.Timestamp
    actor: str
    reason: str
    def __init__(self, state: _Optional[_Union[_respond_pb2.ReviewState, str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("review_id", "response_id", "tenant", "state", "held", "reasons", "governed_text", "decided_text", "decided_sha256", "verdict", "checks", "history", "model", "model_version", "policy_id", "policy_version", "labels", "created_at", "expires_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    GOVERNED_TEXT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_TEXT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    response_id: str
    tenant: str
    state: _respond_pb2.ReviewState
    held: bool
    reasons: _containers.RepeatedCompositeFieldContainer[EscalationReason]
    governed_text: str
    decided_text: str
    decided_sha256: str
    verdict: _respond_pb2.Verdict
    checks: _containers.RepeatedCompositeFieldContainer[_respond_pb2.VerificationCheck]
    history: _containers.RepeatedCompositeFieldContainer[ReviewEvent]
    model: str
    model_version: str
    policy_id: str
    policy_version: str
    labels: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, review_id: _Optional[str] = ..., response_id: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[_respond_pb2.ReviewState, str]] = ..., held: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[EscalationReason, _Mapping]]] = ..., governed_text: _Optional[str] = ..., decided_text: _Optional[str] = ..., decided_sha256: _Optional[str] = ..., verdict: _Optional[_Union[_respond_pb2.Verdict, str]] = ..., checks: _Optional[_Iterable[_Union[_respond_pb2.VerificationCheck, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[ReviewEvent, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., policy_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListReviewsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: _respond_pb2.ReviewState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[_respond_pb2.ReviewState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("reviews", "next_page_token")
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reviews: _containers.RepeatedCompositeFieldContainer[Review]
    next_page_token: str
    def __init__(self, reviews: _Optional[_Iterable[_Union[Review, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetReviewRequest(_message.Message):
    __slots__ = ("review_id",)
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    def __init__(self, review_id: _Optional[str] = ...) -> None: ...

class GetReviewResponse(_message.Message):
    __slots__ = ("review",)
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    review: Review
    def __init__(self, review: _Optional[_Union[Review, _Mapping]] = ...) -> None: ...

class DecideReviewRequest(_message.Message):
    __slots__ = ("review_id", "decision", "replacement_text", "reason")
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    decision: ReviewDecision
    replacement_text: str
    reason: str
    def __init__(self, review_id: _Optional[str] = ..., decision: _Optional[_Union[ReviewDecision, str]] = ..., replacement_text: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DecideReviewResponse(_message.Message):
    __slots__ = ("review",)
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    review: Review
    def __init__(self, review: _Optional[_Union[Review, _Mapping]] = ...) -> None: ...

class WatchReviewRequest(_message.Message):
    __slots__ = ("review_id",)
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    def __init__(self, review_id: _Optional[str] = ...) -> None: ...

class WatchReviewResponse(_message.Message):
    __slots__ = ("review",)
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    review: Review
    def __init__(self, review: _Optional[_Union[Review, _Mapping]] = ...) -> None: ...
