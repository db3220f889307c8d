"""In-process federated simulation through the real codec, regional sums and global round.

:func:`simulate` runs the whole round of the architecture without brokers: every sampled agent
trains locally (:func:`edge_agent.train.train_local`), encodes its delta with the real
:class:`schemas.codec.Codec` (clip, quantize, pack, CKKS-encrypt when ``encrypted``), the chunks go
through one real :class:`regional_aggregator.summing.RegionalSum` per region, the partials through
the real :class:`global_aggregator.combine.GlobalRound` (one decryption of the total), and the
server optimizer steps (:func:`global_aggregator.strategies.server_step`). The distributed
services call the same functions with the same seeds, so their model versions can be compared
with the simulation's bit for bit.

Conventions shared with the services:

* agents ``agent-000`` .. ``agent-{N-1:03d}``, regions ``region-0`` .. (contiguous blocks,
  :func:`global_aggregator.partition.assign_regions`);
* round ``r`` (1-based) trains on model version ``r - 1`` and produces version ``r``;
* quantization seed ``update_seed(seed, r, agent_id)``; local training seed
  ``local_seed(seed, r, agent_id)``; the initial model is ``init_params(..., seed)``.

``float_mode`` replaces the codec by exact float32 averaging weighted by raw sample counts (no
clipping, no quantization, no cap): the reference the quantized/encrypted runs are measured against.

Differential privacy (``SimConfig.privacy``, see :mod:`global_aggregator.privacy`):

* ``distributed`` runs the distributed discrete Gaussian as the services do: the round's codec
  is :meth:`PrivacyPlan.codec_params` (noise on, every weight 1) of the plan for ``rounds``
  rounds, and every device adds its own noise in :meth:`Codec.encode`. The noise comes from
  :meth:`NoiseSource.from_test_seed` of :func:`noise_seed` (seed, round, device): reproducible, so
  a simulation is not private (the services draw it from each device's CSPRNG and cannot be
  compared with a DP simulation bit for bit).
* ``central`` is a comparison that exists only here: the same plan, the same conditional
  rounding and the same accounting, but the devices add no noise; a trusted server adds the
  same total noise once to the decoded integer sum (discrete Gaussian of std
  ``sqrt(n_min) * sigma_device``, integer units). The two modes differ only in who adds it.
* ``privacy_epsilon = inf`` means no noise at all: the run is the non-DP run, bit for bit.

Each round's history entry then carries ``epsilon`` (:meth:`PrivacyPlan.account`: composed
without sampling amplification, the samples being public) and, like the global aggregator, the
run stops after a round when one more would exceed the budget.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.loaders import (
    DeviceContext,
    device_options,
    load_device_data,
    resolve_loader,
)
from edge_agent.models import ModelSpec, init_flat, init_params, project_spec, resolve
from edge_agent.train import LocalTrainConfig, evaluate, local_seed, train_local
from global_aggregator.combine import GlobalRound
from global_aggregator.datasets import TASKS, agent_dataset, server_test_set
from global_aggregator.partition import assign_regions
from global_aggregator.sampling import sample_indices
from global_aggregator.strategies import init_state, make_server_optimizer, server_step
from regional_aggregator.summing import RegionalSum
from schemas.errors import InvalidMessage
from schemas.project import Project
from schemas.settings import FederationSettings, PrivacySettings

if TYPE_CHECKING:
    from global_aggregator.privacy import PrivacyPlan
    from schemas.codec import Codec, CodecParams


def agent_id(index: int) -> str:
    return f"agent-{index:03d}"


def region_id(index: int) -> str:
    return f"region-{index}"


_F = FederationSettings()  # one source of defaults: the settings a deployment starts from
#: ``SimConfig.privacy``: no DP; the services' distributed DP; the same noise added centrally.
PRIVACY_MODES = ("off", "distributed", "central")


def noise_seed(base_seed: int, round_id: int, who: str) -> int:
    """The 256-bit test seed of ``who``'s DP noise in round ``round_id`` (a device id, or
    ``"server"`` for the central comparison's noise): for :meth:`NoiseSource.from_test_seed`.
    SIMULATIONS ONLY: a real device's noise never derives from the federation seed."""
    digest = hashlib.sha256(f"fedstream-sim-dp-noise:{base_seed}:{round_id}:{who}".encode())
    return int.from_bytes(digest.digest(), "little")


@dataclass(frozen=True)
class SimConfig:
    """Every knob of a simulation. The federation's knobs default to
    :class:`~schemas.settings.FederationSettings` (what a deployment starts from);
    :func:`project_config` takes them from a project instead.

    Args:
        task: ``"digits"`` or ``"telemetry"``.
        model: model name (:data:`edge_agent.models.MODELS`); ``None`` = the task's default.
        num_agents, num_regions, rounds: fleet size and length of the run.
        partition, alpha: partitioner (``iid``/``dirichlet``/``quantity``) and its concentration.
        seed: the one base seed (data split, partition, init, sampling, dropout, training, codec).
        encrypted: CKKS-encrypt updates (else the codec's plaintext int64 mode).
        float_mode: exact float32 weighted averaging, no codec at all (the reference).
        bits, clip_l2, clip_coord, max_summands, weight_cap, chunk_bytes: codec parameters.
        local: local training configuration.
        strategy, server_lr, server_momentum, b1, b2, tau: server optimizer.
        clients_per_round: fraction of agents sampled each round (seeded).
        dropout: probability that a sampled agent never delivers its update (seeded).
        federated_eval: also evaluate every agent's local test shard each round.
        min_group: the privacy floor k (regions sum agents in groups of at least k).
        excluded: round -> agent ids left out of that round (what the global excluded after a
            failed bounds check): the reference a federation with an attacker is compared with.
        privacy: ``off``, ``distributed`` (each device adds discrete Gaussian noise) or
            ``central`` (simulation only: the server adds the same total noise once).
        privacy_epsilon, privacy_delta: target (epsilon, delta) after ``rounds`` rounds
            (``inf``: no noise, the non-DP run); or ``privacy_noise_multiplier`` instead.
        privacy_n_min: devices whose noise makes a round's total (0: the round's sample).
    """

    task: str = "digits"
    model: str | None = None
    num_agents: int = 20
    num_regions: int = 4
    rounds: int = _F.rounds
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = _F.seed
    encrypted: bool = _F.codec.encrypted
    float_mode: bool = False
    bits: int = _F.codec.bits
    clip_l2: float = _F.codec.clip_l2
    clip_coord: float = _F.codec.clip_coord
    max_summands: int = _F.codec.max_summands
    weight_cap: int = _F.codec.weight_cap
    chunk_bytes: int = _F.codec.chunk_bytes
    rotate: bool = _F.codec.rotate
    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    strategy: str = _F.strategy
    server_lr: float | None = _F.server_lr
    server_momentum: float = _F.server_momentum
    b1: float = _F.b1
    b2: float = _F.b2
    tau: float = _F.tau
    clients_per_round: float = _F.clients_per_round
    dropout: float = 0.0
    federated_eval: bool = True
    min_group: int = _F.min_group
    min_participants: int = _F.min_participants
    excluded: dict[int, frozenset[str]] = field(default_factory=dict)
    privacy: str = "off"
    privacy_epsilon: float | None = _F.privacy.epsilon
    privacy_delta: float = _F.privacy.delta
    privacy_noise_multiplier: float | None = _F.privacy.noise_multiplier
    privacy_n_min: int = _F.privacy.n_min

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {sorted(TASKS)}")
        if not 0 < self.clients_per_round <= 1:
            raise ValueError(f"clients_per_round must be in (0, 1], got {self.clients_per_round}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rounds < 1 or self.num_agents < 1:
            raise ValueError("rounds and num_agents must be >= 1")
        if self.num_agents > self.max_summands and not self.float_mode:
            raise ValueError(f"{self.num_agents} agents exceed max_summands={self.max_summands}")
        if self.privacy not in PRIVACY_MODES:
            raise ValueError(f"privacy must be one of {PRIVACY_MODES}, got {self.privacy!r}")
        if self.privacy != "off" and self.float_mode:
            raise ValueError("differential privacy needs the codec (its noise is in integer "
                             "units): not with float_mode")
        self.privacy_settings()  # validates the privacy knobs

    def privacy_settings(self) -> PrivacySettings | None:
        """The settings :class:`~global_aggregator.privacy.PrivacyPlan` plans with (``mode``
        distributed also for ``central``: the same plan), or ``None`` when no noise is added
        (privacy off, or ``privacy_epsilon`` infinite).

        Raises:
            ValueError: invalid privacy knobs (as :class:`~schemas.settings.PrivacySettings`).
        """
        if self.privacy == "off" or (self.privacy_epsilon is not None
                                     and math.isinf(self.privacy_epsilon)
                                     and self.privacy_noise_multiplier is None):
            return None
        return PrivacySettings(mode="distributed", epsilon=self.privacy_epsilon,
                               delta=self.privacy_delta,
                               noise_multiplier=self.privacy_noise_multiplier,
                               n_min=self.privacy_n_min)

    @property
    def model_name(self) -> str:
        return self.model or TASKS[self.task].default_model

    def codec_params(self) -> CodecParams:
        from schemas.codec import CodecParams

        return CodecParams(
            bits=self.bits,
            clip_l2=self.clip_l2,
            clip_coord=self.clip_coord,
            max_summands=self.max_summands,
            weight_cap=self.weight_cap,
            encrypted=self.encrypted,
            chunk_bytes=self.chunk_bytes,
            rotate=self.rotate,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_settings(cls, fed: FederationSettings, **sim: Any) -> SimConfig:
        """The simulation of a federation run with ``fed`` (plus simulation-only knobs)."""
        c, t, p = fed.codec, fed.train, fed.privacy
        if p.mode == "example":
            raise ValueError("the simulation does not run example-level DP (DP-SGD) yet")
        if p.mode == "distributed" and "privacy" not in sim:
            sim = dict(sim, privacy="distributed", privacy_epsilon=p.epsilon,
                       privacy_delta=p.delta, privacy_noise_multiplier=p.noise_multiplier,
                       privacy_n_min=p.n_min)
        return cls(
            rounds=fed.rounds, seed=fed.seed, encrypted=c.encrypted, bits=c.bits,
            clip_l2=c.clip_l2, clip_coord=c.clip_coord, max_summands=c.max_summands,
            weight_cap=c.weight_cap, chunk_bytes=c.chunk_bytes, rotate=c.rotate,
            local=LocalTrainConfig(**t.model_dump()),
            strategy=fed.strategy, server_lr=fed.server_lr, server_momentum=fed.server_momentum,
            b1=fed.b1, b2=fed.b2, tau=fed.tau, clients_per_round=fed.clients_per_round,
            min_group=fed.min_group, min_participants=fed.min_participants, **sim)


@dataclass
class SimSetup:
    """What a simulation runs on besides its settings: the model, the fleet and its data.

    ``devices`` are sorted (the index is the sampling index the global aggregator uses);
    ``data[i]`` is device i's ``(x_train, y_train, x_test, y_test)``, or ``None`` when its data
    is unusable (the device is sampled but never delivers, as in a deployment); ``server_test``
    is ``None`` for a project without a server-side evaluation set (the federated evaluation over
    the devices' test sets then stands in for it).
    """

    spec: ModelSpec
    devices: list[str]
    regions: list[str]
    data: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]
    server_test: tuple[np.ndarray, np.ndarray] | None


def builtin_setup(cfg: SimConfig) -> SimSetup:
    """The research tasks: a built-in data set partitioned across ``agent-000``..."""
    _, spec = initial_model(cfg)
    return SimSetup(
        spec=spec, devices=[agent_id(i) for i in range(cfg.num_agents)],
        regions=[region_id(r) for r in assign_regions(cfg.num_agents, cfg.num_regions)],
        data=[agent_dataset(cfg.task, i, cfg.num_agents, cfg.partition, cfg.alpha, cfg.seed)
              for i in range(cfg.num_agents)],
        server_test=server_test_set(cfg.task, cfg.seed),
    )


def project_setup(project: Project, fleet: dict[str, list[str]] | None = None,
                  data_options: dict[str, Any] | None = None) -> SimSetup:
    """A project's simulation: every device's data from the project's own loader, called with
    that device's settings exactly as the edge agent calls it (``data_options`` are what each
    device passes with ``--data``; ``{device_id}`` is substituted)."""
    fleet = fleet if fleet is not None else project.table.simulation.fleet()
    region_of = {d: r for r, ds in fleet.items() for d in ds}
    devices = sorted(region_of)
    spec = project_spec(project)
    loader = resolve_loader(project.table.loader)
    data: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None] = []
    for d in devices:
        ctx = DeviceContext(d, region_of[d], project.root, device_options(
            project.table.loader_options, data_options or {}, device_id=d, region=region_of[d]))
        try:
            ld = load_device_data(loader, ctx, spec.input_shape)
            data.append((ld.x_train, ld.y_train, ld.x_test, ld.y_test))
        except InvalidMessage:
            data.append(None)
    server_test = None
    if project.table.server_eval:
        x, y = resolve(project.table.server_eval, "server_eval")()
        server_test = (np.asarray(x, np.float32), np.asarray(y))
    return SimSetup(spec=spec, devices=devices, regions=[region_of[d] for d in devices],
                    data=data, server_test=server_test)


def project_config(project: Project, fleet: dict[str, list[str]] | None = None,
                   **overrides: Any) -> SimConfig:
    """The :class:`SimConfig` of a project: its federation settings and its simulated fleet."""
    fleet = fleet if fleet is not None else project.table.simulation.fleet()
    return SimConfig.from_settings(project.federation, num_agents=sum(map(len, fleet.values())),
                                   num_regions=len(fleet), **overrides)


#: The research benchmark's settings (bench/simulate.py): 25 rounds of momentum SGD on
#: 20 non-IID digits agents, clip 2.0 / 0.1; the numbers in bench/results/simulate.json.
BENCH_DIGITS = dict(
    task="digits", num_agents=20, num_regions=4, partition="dirichlet", alpha=0.5, rounds=25,
    clip_l2=2.0, clip_coord=0.1,
    local=LocalTrainConfig(optimizer="momentum", lr=0.05, epochs=2, batch_size=16),
)


@dataclass
class SimResult:
    """Per-round history and the final flat parameters (float32)."""

    history: list[dict[str, Any]]
    final_params: np.ndarray
    spec: ModelSpec


def sample_round(cfg: SimConfig, round_id: int) -> tuple[list[int], list[int]]:
    """``(sampled agent indices, those that deliver)`` of a round; seeded, sorted; the same
    choice the global aggregator service makes (:mod:`global_aggregator.sampling`)."""
    return sample_indices(cfg.num_agents, cfg.clients_per_round, cfg.seed, round_id, cfg.dropout)


def initial_model(cfg: SimConfig) -> tuple[np.ndarray, ModelSpec]:
    info = TASKS[cfg.task]
    return init_params(cfg.model_name, info.input_shape, info.num_classes, cfg.seed)


def _float_average(deltas: list[np.ndarray], counts: list[int]) -> np.ndarray:
    acc = np.zeros_like(deltas[0], dtype=np.float64)
    for d, n in zip(deltas, counts, strict=True):
        acc += float(n) * d.astype(np.float64)
    return (acc / float(sum(counts))).astype(np.float32)


def simulate(
    cfg: SimConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    keys: tuple[bytes, bytes] | None = None,
    setup: SimSetup | None = None,
    on_release: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> SimResult:
    """Run ``cfg.rounds`` federated rounds; call ``progress(entry)`` after each.

    Args:
        cfg: the simulation settings.
        progress: called with each round's history entry.
        keys: ``(secret_bytes, public_bytes)`` HE keys for encrypted runs; generated if ``None``.
            Keys only change ciphertexts, never the decrypted sums, so results do not depend on them.
        setup: the model, fleet and data (:func:`project_setup`); default: ``cfg``'s built-in
            task (:func:`builtin_setup`).
        on_release: codec runs: called with ``(round, decoded integer sum, released integer
            sum)`` of every round whose total is averaged; the two differ only by the server's
            noise in the ``central`` comparison. For tests and diagnostics.
    """
    setup = setup if setup is not None else builtin_setup(cfg)
    spec = setup.spec
    params = init_flat(spec, cfg.seed)
    opt = make_server_optimizer(
        cfg.strategy, lr=cfg.server_lr, momentum=cfg.server_momentum, b1=cfg.b1, b2=cfg.b2,
        tau=cfg.tau,
    )
    opt_state = init_state(opt, params)
    shards = setup.data
    regions = setup.regions
    usable = [s for s in shards if s is not None]

    edge_codec = global_codec = rounding_codec = None
    plan = privacy_plan(cfg, spec.num_params)
    spent = None  # the privacy spent so far (pb.Privacy)
    if not cfg.float_mode:
        # Imported here so that float-mode (reference) runs need no HE library.
        from schemas.codec import Codec, update_seed
        from schemas.he import HEContext, generate_keys

        he_edge: HEContext | None = None
        he_global: HEContext | None = None
        if cfg.encrypted:
            secret, public = keys if keys is not None else generate_keys()
            he_edge, he_global = HEContext.from_bytes(public), HEContext.from_bytes(secret)

    history: list[dict[str, Any]] = []
    for round_id in range(1, cfg.rounds + 1):
        if not cfg.float_mode:
            cp = cfg.codec_params().for_round(cfg.seed, round_id)
            if plan is not None:
                noisy = plan.codec_params(cp)  # noise on, every weight 1
                cp = noisy if cfg.privacy == "distributed" else replace(noisy, dp_sigma=0.0,
                                                                        dp_bound=0)
                if cfg.privacy == "central":  # rounds as the noisy codec does: same sensitivity
                    rounding_codec = Codec(replace(noisy, encrypted=False), spec.num_params)
            edge_codec = Codec(cp, spec.num_params, he_edge)
            global_codec = Codec(cp, spec.num_params, he_global)
        t = dict.fromkeys(("train", "encode", "regional_sum", "global_decode", "server_step"), 0.0)
        sampled, delivering = sample_round(cfg, round_id)
        bytes_up = 0
        releases: list[int] = []  # devices in every sum the global decrypted (DP accounting)
        deltas: list[np.ndarray] = []
        counts: list[int] = []
        train_losses: list[float] = []
        left_out = cfg.excluded.get(round_id, frozenset())
        sums = (
            {r: RegionalSum(edge_codec, round_id, min_group=cfg.min_group, seed=cfg.seed,
                            region=r,
                            expected=[setup.devices[i] for i in sampled if regions[i] == r])
             for r in sorted(set(regions))}
            if edge_codec is not None
            else {}
        )
        for i in sampled:
            aid = setup.devices[i]
            shard = shards[i]
            if shard is None:  # unusable data: the device sits the round out
                continue
            x, y, _, _ = shard
            t0 = time.perf_counter()
            delta, n, metrics = train_local(
                spec, params, x, y, cfg.local, local_seed(cfg.seed, round_id, aid)
            )
            t["train"] += time.perf_counter() - t0
            train_losses.append(metrics["loss"])
            if i not in delivering or aid in left_out:  # trained, but the update never counts
                continue
            if edge_codec is None:
                deltas.append(delta)
                counts.append(n)
                bytes_up += delta.nbytes
                continue
            t0 = time.perf_counter()
            if plan is None:
                chunks = edge_codec.encode(delta, n, update_seed(cfg.seed, round_id, aid))
            else:
                chunks = _dp_encode(cfg, edge_codec, rounding_codec, delta, n, round_id, aid)
            t["encode"] += time.perf_counter() - t0
            bytes_up += sum(len(c) for c in chunks)
            t0 = time.perf_counter()
            for ci, payload in enumerate(chunks):
                sums[regions[i]].add_chunk(aid, ci, len(chunks), payload,
                                           weight=edge_codec.weight(n))
            t["regional_sum"] += time.perf_counter() - t0

        participants = len([i for i in delivering if setup.devices[i] not in left_out
                            and shards[i] is not None])
        if participants:
            t0 = time.perf_counter()
            avg: np.ndarray | None
            if global_codec is None:
                avg = _float_average(deltas, counts)
            else:
                noise = partial(_server_noise, cfg, plan, round_id, spec.num_params) \
                    if plan is not None and cfg.privacy == "central" else None
                codec: Any = global_codec if noise is None and on_release is None else \
                    _Release(global_codec, round_id, noise, on_release)
                gr = GlobalRound(codec, round_id, min_group=cfg.min_group)
                for r, rs in sums.items():
                    groups = rs.groups()
                    for g, group in enumerate(groups):
                        for ci, payload in enumerate(group.payloads):
                            gr.add_partial(r, g, len(groups), ci, payload,
                                           group.agents, group.weights)
                result = gr.finish()
                avg, participants = result.avg_delta, result.num_participants
                # central: the trusted server releases one noisy sum of n_min devices' noise
                releases = result.releases if noise is None else \
                    [plan.n_min] if plan is not None and avg is not None else []
            t["global_decode"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if avg is not None:
                params, opt_state = server_step(opt, params, opt_state, avg)
            t["server_step"] += time.perf_counter() - t0

        entry: dict[str, Any] = {
            "round": round_id,
            "participants": participants,
            "sampled": len(sampled),
            "bytes_up": bytes_up,
            "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
            "timings": t,
        }
        budget_reached = False
        if plan is not None:
            spent = plan.account(spent, cfg.num_agents, len(sampled), releases)
            entry["epsilon"] = spent.epsilon
            budget_reached = not plan.may_run_another(spent, cfg.num_agents, len(sampled))
        elif cfg.privacy != "off":
            entry["epsilon"] = math.inf  # epsilon = inf: no noise, no privacy
        if setup.server_test is not None:
            entry.update(evaluate(spec, params, *setup.server_test))
        if cfg.federated_eval or setup.server_test is None:
            local = [evaluate(spec, params, s[2], s[3]) for s in usable]
            sizes = np.array([len(s[3]) for s in usable], np.float64)
            for k in local[0] if local else ():
                fed = float(np.dot([m[k] for m in local], sizes) / sizes.sum())
                entry[f"fed_{k}"] = fed
                if setup.server_test is None:  # no server-side set: judged by the devices
                    entry.setdefault(k, fed)
        history.append(entry)
        if progress is not None:
            progress(entry)
        if budget_reached and round_id < cfg.rounds:  # as the global: this version is final
            break
    return SimResult(history=history, final_params=params, spec=spec)


def privacy_plan(cfg: SimConfig, num_params: int) -> PrivacyPlan | None:
    """The DP plan of a run (``None``: no noise): :meth:`PrivacyPlan.make` for ``cfg.rounds``
    rounds of the round-1 sample of ``cfg.num_agents`` devices, as the global aggregator plans.

    Raises:
        ValueError: a target epsilon no noise can meet, or ``n_min`` above the sample.
    """
    settings = cfg.privacy_settings()
    if settings is None:
        return None
    from global_aggregator.privacy import PrivacyPlan

    return PrivacyPlan.make(settings, cfg.codec_params(), num_params, rounds=cfg.rounds,
                            population=cfg.num_agents, sample=len(sample_round(cfg, 1)[0]))


def central_noise_std(plan: PrivacyPlan) -> float:
    """Std (integer units) of the central comparison's server noise: ``sqrt(n_min)`` devices'
    worth of the distributed noise, the total the plan accounts for."""
    return math.sqrt(plan.n_min) * plan.sigma_device


def _dp_encode(cfg: SimConfig, codec: Codec, rounding: Codec | None, delta: np.ndarray,
               n: int, round_id: int, aid: str) -> list[bytes]:
    """One device's payloads with DP: its noisy update (distributed), or the same conditionally
    rounded update without the noise (central; ``rounding`` is the round's noisy codec, whose
    :meth:`~schemas.codec.Codec.round_update` both modes round with)."""
    from schemas.dp import NoiseSource
    from schemas.plan import update_seed

    useed, nseed = update_seed(cfg.seed, round_id, aid), noise_seed(cfg.seed, round_id, aid)
    if rounding is None:
        return codec.encode(delta, n, useed, NoiseSource.from_test_seed(nseed))
    return codec.encode_quantized(rounding.round_update(delta, n, useed), codec.weight(n))


def _server_noise(cfg: SimConfig, plan: PrivacyPlan, round_id: int, num_params: int
                  ) -> np.ndarray:
    """The central comparison's noise of a round (int64, integer units)."""
    from schemas.dp import NoiseSource, discrete_gaussian

    src = NoiseSource.from_test_seed(noise_seed(cfg.seed, round_id, "server"))
    return discrete_gaussian(src, central_noise_std(plan), num_params)


class _Release:
    """The global's codec as :class:`GlobalRound` uses it, watching the one sum the round
    averages (what it releases): the central comparison's trusted server adds its noise there,
    and ``observe(round, decoded, released)`` sees both."""

    def __init__(self, codec: Codec, round_id: int, noise: Callable[[], np.ndarray] | None,
                 observe: Callable[[int, np.ndarray, np.ndarray], None] | None) -> None:
        self._codec, self._round, self._noise, self._observe = codec, round_id, noise, observe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._codec, name)

    def average(self, qsum: np.ndarray, weight_sum: int) -> np.ndarray:
        released = qsum if self._noise is None else qsum + self._noise()
        if self._observe is not None:
            self._observe(self._round, qsum.copy(), released.copy())
        return self._codec.average(released, weight_sum)


def rounds_to_reach(history: list[dict[str, Any]], target: float) -> int | None:
    """First round whose server accuracy is at least ``target`` (``None`` if never)."""
    for e in history:
        if e.get("accuracy", float("-inf")) >= target:
            return int(e["round"])
    return None


def replay_fedbuff(cfg: SimConfig, setup: SimSetup,
                   steps: list[list[tuple[str, int, int]]]) -> list[np.ndarray]:
    """Recompute a FedBuff run from what its versions say they counted.

    ``steps[j]`` lists the updates of the step that made version ``j + 1``: ``(device, base
    round, multiplicity)``. An update for base round ``b`` was trained on version ``b - 1`` (the
    version whose task is round ``b``) with the service's seeds; the step's average is
    ``sum m_i q_i / sum m_i w_i`` of the quantized updates (integer sums, as the encrypted ones
    decode) and the server optimizer steps once per step. Returns the parameters of versions
    0..len(steps): a distributed run that counted each update exactly once, as it says, ends
    on the same bits.
    """
    from schemas.codec import Codec, update_seed

    spec = setup.spec
    # quantization does not depend on encryption: CKKS sums decode to these integer sums
    codec = Codec(replace(cfg.codec_params().for_round(cfg.seed, 0), encrypted=False),
                  spec.num_params, None)
    opt = make_server_optimizer(cfg.strategy, lr=cfg.server_lr, momentum=cfg.server_momentum,
                                b1=cfg.b1, b2=cfg.b2, tau=cfg.tau)
    versions = [init_flat(spec, cfg.seed)]
    state = init_state(opt, versions[0])
    index = {d: i for i, d in enumerate(setup.devices)}
    for updates in steps:
        params = versions[-1]
        if len(updates) >= cfg.min_participants:
            qsum = np.zeros(spec.num_params, np.int64)
            wsum = 0
            for device, base, times in updates:
                shard = setup.data[index[device]]
                assert shard is not None, f"{device} has no data but counted"
                x, y, _, _ = shard
                delta, n, _ = train_local(spec, versions[base - 1], x, y, cfg.local,
                                          local_seed(cfg.seed, base, device))
                qsum += times * codec.quantize_update(delta, n, update_seed(cfg.seed, base,
                                                                            device))
                wsum += times * codec.weight(n)
            avg = np.asarray(codec.average(qsum, wsum), np.float32)
            params, state = server_step(opt, params, state, avg)
        versions.append(np.asarray(params, np.float32))
    return versions
