"""The federation's settings: one typed model, read from the project's table, the environment and
the command line, with every default written once, here.

:class:`FederationSettings` is what ``[tool.fedstream.federation]`` of a project holds: rounds,
strategy, sampling, deadlines, the codec (:class:`CodecSettings`) and local training
(:class:`TrainSettings`). The global aggregator's settings extend it (so ``--rounds`` or
``FEDSTREAM_ROUNDS`` override the project's ``rounds``), and ``fedstream-simulate`` builds its
:class:`~global_aggregator.simulation.SimConfig` from the same model, so a simulation and a
deployment of one project start from the same numbers.

Precedence, highest first: command-line flags, ``FEDSTREAM_*`` environment variables (nested
fields with ``__``: ``FEDSTREAM_CODEC__BITS=6``), the project's table, the defaults below.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.fedbuff import FedBuff
from schemas.plan import CodecParams

_C = CodecParams  # the codec's defaults live on its own parameters

#: Server optimizers (global_aggregator.strategies.STRATEGIES has one factory per name).
Strategy = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
LocalOptimizer = Literal["sgd", "momentum", "adam"]


class CodecSettings(BaseModel):
    """How updates are clipped, quantized, packed and chunked (they travel in the round task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(_C.bits, ge=2, le=16, description="quantization bits per value")
    clip_l2: float = Field(_C.clip_l2, gt=0, description="L2 clip of a device's delta")
    clip_coord: float = Field(_C.clip_coord, gt=0, description="per-coordinate clip (quantization range)")
    max_summands: int = Field(_C.max_summands, ge=1, description="largest number of updates one sum may hold")
    weight_cap: int = Field(_C.weight_cap, ge=1, description="cap of a device's sample-count weight")
    chunk_bytes: int = Field(
        _C.chunk_bytes, ge=4096, le=1 << 30,
        description="target bytes of one update chunk, i.e. one MQTT message; below the "
        "broker's limit (AWS IoT Core: 128 KB, Azure IoT Hub: 256 KB)",
    )
    encrypted: bool = Field(_C.encrypted, description="CKKS-encrypt updates (off: trusted deployments)")
    rotate: bool = Field(
        _C.rotate, description="randomly rotate (randomized Hadamard) each update before "
        "quantization, so few bits lose little; the server undoes it")

    def params(self) -> CodecParams:
        """The codec parameters (rotation seed 0: see :meth:`CodecParams.for_round`)."""
        return CodecParams(**self.model_dump())


class TrainSettings(BaseModel):
    """A device's local training in each round (travels in the round task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: LocalOptimizer = Field("sgd", description="local optimizer")
    lr: float = Field(0.1, gt=0, description="local learning rate")
    epochs: int = Field(2, ge=1, description="local epochs per round")
    batch_size: int = Field(16, ge=0, description="local minibatch size (0: full batch)")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal coefficient")


class PrivacySettings(BaseModel):
    """Differential privacy (:mod:`schemas.dp`, ``docs/privacy.md``).

    ``distributed``: every device adds discrete Gaussian noise to its quantized update before
    encryption, so that the sum over ``n_min`` devices carries the noise a trusted server would
    add (Kairouz, Liu, Steinke 2021); the global accounts each round with ``dp-accounting``
    and stops before the budget would be exceeded. ``example``: DP-SGD inside each device's
    local training (per-example clipping and noise); each device accounts for its own data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["off", "distributed", "example"] = Field(
        "off", description="off; distributed (device-level noise that sums to central DP "
        "under the encryption); example (DP-SGD in local training)")
    epsilon: float | None = Field(
        None, gt=0, description="target epsilon after `rounds` rounds: the noise is planned for "
        "it and the global stops before exceeding it (or give noise_multiplier)")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    noise_multiplier: float | None = Field(
        None, gt=0, description="instead of epsilon: noise std over the sensitivity (of the "
        "round's total in distributed mode, of a batch's gradient sum in example mode)")
    budget: float | None = Field(
        None, gt=0, description="distributed: stop publishing new versions before epsilon "
        "would exceed this (default: epsilon)")
    n_min: int = Field(
        0, ge=0, description="distributed: the noise of this many devices makes a round's "
        "total noise (default: the devices selected per round); a round with fewer reports "
        "its actual, larger epsilon")
    example_clip: float = Field(1.0, gt=0, description="example: per-example gradient L2 clip")

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacySettings:
        if self.mode == "off":
            return self
        if (self.epsilon is None) == (self.noise_multiplier is None) and self.mode == "distributed":
            raise ValueError("privacy: distributed mode takes either epsilon or "
                             "noise_multiplier, exactly one")
        if self.mode == "example" and self.noise_multiplier is None:
            raise ValueError("privacy: example mode takes noise_multiplier (each device's "
                             "epsilon depends on its own data and is reported by the device)")
        return self


class FederationSettings(BaseModel):
    """Everything about how a federation runs that is not a deployment detail."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(15, ge=1, description="rounds to run")
    strategy: Strategy = Field("fedavg", description="server optimizer")
    server_lr: float | None = Field(
        None, gt=0, description="server learning rate (default: the strategy's own)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm momentum")
    b1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi first-moment decay")
    b2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi second-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptivity of fedadam/fedyogi/fedadagrad")
    seed: int = Field(0, ge=0, description="federation seed (init, sampling, rounding)")
    clients_per_round: float = Field(
        1.0, gt=0, le=1, description="fraction of devices sampled each round")
    min_participants: int = Field(
        1, ge=1, description="devices a round needs before the model may change")
    deadline_s: float = Field(60.0, gt=0, description="seconds devices have per round")
    grace_s: float = Field(15.0, ge=0, description="extra seconds to wait for regions")
    min_group: int = Field(
        2, ge=1, description="privacy floor k: no sum of fewer devices is ever decrypted "
        "(regions sum devices in groups of at least k)")
    quarantine_after: int = Field(
        3, ge=1, description="quarantine a device after this many failed rounds in a row")
    mode: Literal["sync", "fedbuff"] = Field(
        "sync", description="sync: rounds that wait for their selected devices (or the "
        "deadline); fedbuff: buffered asynchronous aggregation, a server step after every "
        "buffer_size updates, stale updates down-weighted")
    buffer_size: int = Field(10, ge=1, description="fedbuff: updates per server step")
    max_staleness: int = Field(
        4, ge=0, description="fedbuff: refuse updates trained on a round more than this many "
        "rounds before the region's current one")
    staleness_scale: int = Field(
        4, ge=1, le=64, description="fedbuff: a fresh update counts this many times, one t "
        "rounds old max(1, round(scale / (1 + t) ** staleness_exponent)) times")
    staleness_exponent: float = Field(0.5, ge=0, le=8, description="fedbuff: see staleness_scale")
    codec: CodecSettings = CodecSettings()
    train: TrainSettings = TrainSettings()
    privacy: PrivacySettings = PrivacySettings()

    def fedbuff(self) -> FedBuff | None:
        """The FedBuff settings in fedbuff mode, else ``None``."""
        if self.mode != "fedbuff":
            return None
        return FedBuff(self.buffer_size, self.max_staleness, self.staleness_scale,
                       self.staleness_exponent)
