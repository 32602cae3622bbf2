from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifierMessage(_message.Message):
    __slots__ = ("start", "verdict", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: Start
    verdict: Verdict
    stop: Stop
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("sequence_id", "prompt_token_ids", "temperature", "top_k", "top_p", "seed", "k", "tree_nodes", "push", "push_outcomes")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PUSH_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    k: int
    tree_nodes: int
    push: bool
    push_outcomes: int
    def __init__(self, sequence_id: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., k: _Optional[int] = ..., tree_nodes: _Optional[int] = ..., push: _Optional[bool] = ..., push_outcomes: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("sequence_id", "accepted", "next_token", "k", "path", "tree_nodes", "then_tokens", "taken")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    THEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    accepted: int
    next_token: int
    k: int
    path: _containers.RepeatedScalarFieldContainer[int]
    tree_nodes: int
    then_tokens: _containers.RepeatedScalarFieldContainer[int]
    taken: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence_id: _Optional[int] = ..., accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., k: _Optional[int] = ..., path: _Optional[_Iterable[int]] = ..., tree_nodes: _Optional[int] = ..., then_tokens: _Optional[_Iterable[int]] = ..., taken: _Optional[_Iterable[int]] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    def __init__(self, sequence_id: _Optional[int] = ...) -> None: ...

class DrafterMessage(_message.Message):
    __slots__ = ("draft", "speculation")
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    draft: Draft
    speculation: Speculation
    def __init__(self, draft: _Optional[_Union[Draft, _Mapping]] = ..., speculation: _Optional[_Union[Speculation, _Mapping]] = ...) -> None: ...

class Speculation(_message.Message):
    __slots__ = ("sequence_id", "context_length", "last_token", "draft")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    context_length: int
    last_token: int
    draft: Draft
    def __init__(self, sequence_id: _Optional[int] = ..., context_length: _Optional[int] = ..., last_token: _Optional[int] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("sequence_id", "tokens", "q", "weight_version", "unknown_sequence", "draft_seconds", "forward_passes", "parents")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDistribution]
    weight_version: str
    unknown_sequence: bool
    draft_seconds: float
    forward_passes: int
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence_id: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDistribution, _Mapping]]] = ..., weight_version: _Optional[str] = ..., unknown_sequence: _Optional[bool] = ..., draft_seconds: _Optional[float] = ..., forward_passes: _Optional[int] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...
