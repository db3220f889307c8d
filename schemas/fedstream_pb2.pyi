from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    MODEL_VERSION: _ClassVar[Kind]
    UPDATE_CHUNK: _ClassVar[Kind]
    PARTIAL_CHUNK: _ClassVar[Kind]
    RECEIPT: _ClassVar[Kind]
    CONTROL: _ClassVar[Kind]
    FLEET_RECORD: _ClassVar[Kind]
KIND_UNSPECIFIED: Kind
MODEL_VERSION: Kind
UPDATE_CHUNK: Kind
PARTIAL_CHUNK: Kind
RECEIPT: Kind
CONTROL: Kind
FLEET_RECORD: Kind

class Envelope(_message.Message):
    __slots__ = ("schema_version", "kind", "signer", "body", "signature")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    kind: Kind
    signer: str
    body: bytes
    signature: bytes
    def __init__(self, schema_version: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., signer: _Optional[str] = ..., body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("schema_version", "sender", "round", "model_version", "he_fingerprint", "chunk_index", "chunk_count")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    sender: str
    round: int
    model_version: int
    he_fingerprint: str
    chunk_index: int
    chunk_count: int
    def __init__(self, schema_version: _Optional[int] = ..., sender: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., he_fingerprint: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class CodecSpec(_message.Message):
    __slots__ = ("bits", "clip_l2", "clip_coord", "max_summands", "weight_cap", "encrypted", "chunk_bytes", "rotate", "rotation_seed", "dp_sigma", "dp_bound")
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_L2_FIELD_NUMBER: _ClassVar[int]
    CLIP_COORD_FIELD_NUMBER: _ClassVar[int]
    MAX_SUMMANDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROTATE_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SEED_FIELD_NUMBER: _ClassVar[int]
    DP_SIGMA_FIELD_NUMBER: _ClassVar[int]
    DP_BOUND_FIELD_NUMBER: _ClassVar[int]
    bits: int
    clip_l2: float
    clip_coord: float
    max_summands: int
    weight_cap: int
    encrypted: bool
    chunk_bytes: int
    rotate: bool
    rotation_seed: int
    dp_sigma: float
    dp_bound: int
    def __init__(self, bits: _Optional[int] = ..., clip_l2: _Optional[float] = ..., clip_coord: _Optional[float] = ..., max_summands: _Optional[int] = ..., weight_cap: _Optional[int] = ..., encrypted: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., rotate: _Optional[bool] = ..., rotation_seed: _Optional[int] = ..., dp_sigma: _Optional[float] = ..., dp_bound: _Optional[int] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("optimizer", "lr", "epochs", "batch_size", "prox_mu", "dp_clip", "dp_noise_multiplier", "dp_delta")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    prox_mu: float
    dp_clip: float
    dp_noise_multiplier: float
    dp_delta: float
    def __init__(self, optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., prox_mu: _Optional[float] = ..., dp_clip: _Optional[float] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_delta: _Optional[float] = ...) -> None: ...

class RoundTask(_message.Message):
    __slots__ = ("round", "model_version", "codec", "train", "deadline_unix", "min_participants", "he_fingerprint", "seed", "selected_agents", "model_name", "task_name", "quarantined_agents", "min_group", "suspected_agents", "project_hash", "project_version", "fedbuff")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    HE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SELECTED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    MIN_GROUP_FIELD_NUMBER: _ClassVar[int]
    SUSPECTED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    PROJECT_HASH_FIELD_NUMBER: _ClassVar[int]
    PROJECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDBUFF_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    codec: CodecSpec
    train: TrainSpec
    deadline_unix: float
    min_participants: int
    he_fingerprint: str
    seed: int
    selected_agents: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    task_name: str
    quarantined_agents: _containers.RepeatedScalarFieldContainer[str]
    min_group: int
    suspected_agents: _containers.RepeatedScalarFieldContainer[str]
    project_hash: str
    project_version: str
    fedbuff: FedBuffSpec
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., min_participants: _Optional[int] = ..., he_fingerprint: _Optional[str] = ..., seed: _Optional[int] = ..., selected_agents: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., task_name: _Optional[str] = ..., quarantined_agents: _Optional[_Iterable[str]] = ..., min_group: _Optional[int] = ..., suspected_agents: _Optional[_Iterable[str]] = ..., project_hash: _Optional[str] = ..., project_version: _Optional[str] = ..., fedbuff: _Optional[_Union[FedBuffSpec, _Mapping]] = ...) -> None: ...

class FedBuffSpec(_message.Message):
    __slots__ = ("buffer_size", "max_staleness", "staleness_scale", "staleness_exponent")
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SCALE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    buffer_size: int
    max_staleness: int
    staleness_scale: int
    staleness_exponent: float
    def __init__(self, buffer_size: _Optional[int] = ..., max_staleness: _Optional[int] = ..., staleness_scale: _Optional[int] = ..., staleness_exponent: _Optional[float] = ...) -> None: ...

class RegionParticipants(_message.Message):
    __slots__ = ("region", "agents", "base_rounds", "multiplicities")
    REGION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLICITIES_FIELD_NUMBER: _ClassVar[int]
    region: str
    agents: _containers.RepeatedScalarFieldContainer[str]
    base_rounds: _containers.RepeatedScalarFieldContainer[int]
    multiplicities: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, region: _Optional[str] = ..., agents: _Optional[_Iterable[str]] = ..., base_rounds: _Optional[_Iterable[int]] = ..., multiplicities: _Optional[_Iterable[int]] = ...) -> None: ...

class ExcludedGroup(_message.Message):
    __slots__ = ("region", "agents", "reason", "detail")
    REGION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    region: str
    agents: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    detail: str
    def __init__(self, region: _Optional[str] = ..., agents: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class Quarantine(_message.Message):
    __slots__ = ("strikes", "agents")
    class StrikesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STRIKES_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    strikes: _containers.ScalarMap[str, int]
    agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, strikes: _Optional[_Mapping[str, int]] = ..., agents: _Optional[_Iterable[str]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("parent_version", "round", "participants", "metrics", "codec", "strategy", "created_unix", "excluded", "rollback", "canary", "privacy")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    parent_version: int
    round: int
    participants: _containers.RepeatedCompositeFieldContainer[RegionParticipants]
    metrics: _containers.ScalarMap[str, float]
    codec: CodecSpec
    strategy: str
    created_unix: float
    excluded: _containers.RepeatedCompositeFieldContainer[ExcludedGroup]
    rollback: Rollback
    canary: CanaryDecision
    privacy: Privacy
    def __init__(self, parent_version: _Optional[int] = ..., round: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[RegionParticipants, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., codec: _Optional[_Union[CodecSpec, _Mapping]] = ..., strategy: _Optional[str] = ..., created_unix: _Optional[float] = ..., excluded: _Optional[_Iterable[_Union[ExcludedGroup, _Mapping]]] = ..., rollback: _Optional[_Union[Rollback, _Mapping]] = ..., canary: _Optional[_Union[CanaryDecision, _Mapping]] = ..., privacy: _Optional[_Union[Privacy, _Mapping]] = ...) -> None: ...

class PrivacyRound(_message.Message):
    __slots__ = ("population", "sample", "contributors", "noise_multiplier")
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    population: int
    sample: int
    contributors: int
    noise_multiplier: float
    def __init__(self, population: _Optional[int] = ..., sample: _Optional[int] = ..., contributors: _Optional[int] = ..., noise_multiplier: _Optional[float] = ...) -> None: ...

class Privacy(_message.Message):
    __slots__ = ("mode", "epsilon", "delta", "budget", "sigma_device", "sensitivity", "n_min", "rounds", "delta_with_redraws", "budget_reached", "epsilon_amplified")
    MODE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SIGMA_DEVICE_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    N_MIN_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DELTA_WITH_REDRAWS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_REACHED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_AMPLIFIED_FIELD_NUMBER: _ClassVar[int]
    mode: str
    epsilon: float
    delta: float
    budget: float
    sigma_device: float
    sensitivity: float
    n_min: int
    rounds: _containers.RepeatedCompositeFieldContainer[PrivacyRound]
    delta_with_redraws: float
    budget_reached: bool
    epsilon_amplified: float
    def __init__(self, mode: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., budget: _Optional[float] = ..., sigma_device: _Optional[float] = ..., sensitivity: _Optional[float] = ..., n_min: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[PrivacyRound, _Mapping]]] = ..., delta_with_redraws: _Optional[float] = ..., budget_reached: _Optional[bool] = ..., epsilon_amplified: _Optional[float] = ...) -> None: ...

class Rollback(_message.Message):
    __slots__ = ("to_version", "request_id", "requested_by", "reason", "discarded_round")
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_ROUND_FIELD_NUMBER: _ClassVar[int]
    to_version: int
    request_id: str
    requested_by: str
    reason: str
    discarded_round: int
    def __init__(self, to_version: _Optional[int] = ..., request_id: _Optional[str] = ..., requested_by: _Optional[str] = ..., reason: _Optional[str] = ..., discarded_round: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("header", "model_name", "num_params", "params", "optimizer_state", "provenance", "next_task", "final", "quarantine", "fedbuff_state", "canary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_TASK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    FEDBUFF_STATE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    header: Header
    model_name: str
    num_params: int
    params: bytes
    optimizer_state: bytes
    provenance: Provenance
    next_task: RoundTask
    final: bool
    quarantine: Quarantine
    fedbuff_state: FedBuffState
    canary: Canary
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., model_name: _Optional[str] = ..., num_params: _Optional[int] = ..., params: _Optional[bytes] = ..., optimizer_state: _Optional[bytes] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., next_task: _Optional[_Union[RoundTask, _Mapping]] = ..., final: _Optional[bool] = ..., quarantine: _Optional[_Union[Quarantine, _Mapping]] = ..., fedbuff_state: _Optional[_Union[FedBuffState, _Mapping]] = ..., canary: _Optional[_Union[Canary, _Mapping]] = ...) -> None: ...

class Canary(_message.Message):
    __slots__ = ("regions", "stable_version", "baseline_accuracy", "max_drop", "has_baseline")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAX_DROP_FIELD_NUMBER: _ClassVar[int]
    HAS_BASELINE_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedScalarFieldContainer[str]
    stable_version: int
    baseline_accuracy: float
    max_drop: float
    has_baseline: bool
    def __init__(self, regions: _Optional[_Iterable[str]] = ..., stable_version: _Optional[int] = ..., baseline_accuracy: _Optional[float] = ..., max_drop: _Optional[float] = ..., has_baseline: _Optional[bool] = ...) -> None: ...

class CanaryDecision(_message.Message):
    __slots__ = ("candidate_version", "stable_version", "regions", "baseline_accuracy", "canary_accuracy", "examples", "decision", "reason")
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CANARY_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    candidate_version: int
    stable_version: int
    regions: _containers.RepeatedScalarFieldContainer[str]
    baseline_accuracy: float
    canary_accuracy: float
    examples: float
    decision: str
    reason: str
    def __init__(self, candidate_version: _Optional[int] = ..., stable_version: _Optional[int] = ..., regions: _Optional[_Iterable[str]] = ..., baseline_accuracy: _Optional[float] = ..., canary_accuracy: _Optional[float] = ..., examples: _Optional[float] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FedBuffState(_message.Message):
    __slots__ = ("agents", "base_rounds", "partials_offset")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PARTIALS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedScalarFieldContainer[str]
    base_rounds: _containers.RepeatedScalarFieldContainer[int]
    partials_offset: int
    def __init__(self, agents: _Optional[_Iterable[str]] = ..., base_rounds: _Optional[_Iterable[int]] = ..., partials_offset: _Optional[int] = ...) -> None: ...

class EvalSums(_message.Message):
    __slots__ = ("loss_sum", "accuracy_sum", "count")
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    loss_sum: float
    accuracy_sum: float
    count: float
    def __init__(self, loss_sum: _Optional[float] = ..., accuracy_sum: _Optional[float] = ..., count: _Optional[float] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "agent_id", "region", "payload", "eval", "weight", "project_version", "declined")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROJECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    header: Header
    agent_id: str
    region: str
    payload: bytes
    eval: EvalSums
    weight: int
    project_version: str
    declined: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., agent_id: _Optional[str] = ..., region: _Optional[str] = ..., payload: _Optional[bytes] = ..., eval: _Optional[_Union[EvalSums, _Mapping]] = ..., weight: _Optional[int] = ..., project_version: _Optional[str] = ..., declined: _Optional[str] = ...) -> None: ...

class PartialChunk(_message.Message):
    __slots__ = ("header", "region", "agents", "payload", "eval", "update_bytes", "group", "group_count", "weights", "batch", "region_complete", "declined", "base_rounds", "multiplicities")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GROUP_COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REGION_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLICITIES_FIELD_NUMBER: _ClassVar[int]
    header: Header
    region: str
    agents: _containers.RepeatedScalarFieldContainer[str]
    payload: bytes
    eval: EvalSums
    update_bytes: int
    group: int
    group_count: int
    weights: _containers.RepeatedScalarFieldContainer[int]
    batch: str
    region_complete: bool
    declined: _containers.RepeatedScalarFieldContainer[str]
    base_rounds: _containers.RepeatedScalarFieldContainer[int]
    multiplicities: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., region: _Optional[str] = ..., agents: _Optional[_Iterable[str]] = ..., payload: _Optional[bytes] = ..., eval: _Optional[_Union[EvalSums, _Mapping]] = ..., update_bytes: _Optional[int] = ..., group: _Optional[int] = ..., group_count: _Optional[int] = ..., weights: _Optional[_Iterable[int]] = ..., batch: _Optional[str] = ..., region_complete: _Optional[bool] = ..., declined: _Optional[_Iterable[str]] = ..., base_rounds: _Optional[_Iterable[int]] = ..., multiplicities: _Optional[_Iterable[int]] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("header", "action", "agents", "to_version", "request_id", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: Header
    action: str
    agents: _containers.RepeatedScalarFieldContainer[str]
    to_version: int
    request_id: str
    reason: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., action: _Optional[str] = ..., agents: _Optional[_Iterable[str]] = ..., to_version: _Optional[int] = ..., request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FleetRecord(_message.Message):
    __slots__ = ("header", "action", "identity", "role", "region", "public_key", "effective_round", "certificate", "previous_key")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_ROUND_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_KEY_FIELD_NUMBER: _ClassVar[int]
    header: Header
    action: str
    identity: str
    role: str
    region: str
    public_key: bytes
    effective_round: int
    certificate: bytes
    previous_key: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., action: _Optional[str] = ..., identity: _Optional[str] = ..., role: _Optional[str] = ..., region: _Optional[str] = ..., public_key: _Optional[bytes] = ..., effective_round: _Optional[int] = ..., certificate: _Optional[bytes] = ..., previous_key: _Optional[bytes] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("header", "region", "agents")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    region: str
    agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., region: _Optional[str] = ..., agents: _Optional[_Iterable[str]] = ...) -> None: ...
