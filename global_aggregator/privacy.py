"""The global aggregator's privacy bookkeeping for distributed DP (``privacy.mode =
distributed``).

At start, :class:`PrivacyPlan` turns the federation's settings into the noise every device adds
(``CodecParams.dp_sigma`` / ``dp_bound``, in the round task): the per-device std such that
``n_min`` devices' noise together makes a total that meets the target epsilon after ``rounds``
rounds (or the noise multiplier given). After every round it accounts what was really released:
every decrypted sum is a Gaussian-like release whose noise is that of the devices in it, so the
round's event uses the smallest decrypted sum (:attr:`RoundResult.releases`); a round with fewer
devices than ``n_min`` reports its larger epsilon, never the planned one. The accounting lives in
each model version's provenance (``Provenance.privacy``: every round's event), so a restarted
global continues from it, and a reader can recompute epsilon with ``dp-accounting`` alone.

Before a round starts, the plan asks whether one more round at ``n_min`` devices would exceed
the budget; if it would, the version just made is final and the global says why.

Which epsilon: the sample of every round is public (the round task names the selected devices,
and the global draws it from a seed), so privacy amplification by subsampling does not hold
against the global, the regions, the devices or any reader of the model topic. ``epsilon`` (the
budget's) therefore composes every round unsampled, as if every device were in every round;
``epsilon_amplified`` (dp-accounting's sampling without replacement) is what an observer who does
not know the samples would face, reported for comparison only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from schemas import dp
from schemas import fedstream_pb2 as pb
from schemas.plan import NOISE_REDRAW_PROB, CodecParams, dp_l2_bound, dp_noise_bound
from schemas.settings import PrivacySettings

log = logging.getLogger("fedstream.global")

@dataclass(frozen=True)
class PrivacyPlan:
    """The noise of a federation's rounds and the accounting of what they released."""

    settings: PrivacySettings
    device_l2: float  # L2 bound of one device's rounded update, quantization steps
    sigma_device: float  # per-device discrete Gaussian std, quantization steps
    noise_bound: int  # per-device, per-value bound of the noise
    n_min: int
    num_params: int

    @classmethod
    def make(cls, settings: PrivacySettings, codec: CodecParams, num_params: int, *,
             rounds: int, population: int, sample: int) -> PrivacyPlan:
        """Plan the noise for ``rounds`` rounds that each select ``sample`` of ``population``
        devices.

        Raises:
            ValueError: not distributed mode, ``n_min`` above ``sample``, or a target epsilon
                no noise can meet.
        """
        if settings.mode != "distributed":
            raise ValueError("a privacy plan is for distributed mode")
        n_min = settings.n_min or sample
        if n_min > sample:
            raise ValueError(f"privacy.n_min {n_min} is more than the {sample} devices a round "
                             "selects")
        device_l2 = dp_l2_bound(replace(codec, weight_cap=1), num_params)
        sens = dp.sum_sensitivity(device_l2)
        if settings.noise_multiplier is not None:
            sigma = max(0.5, settings.noise_multiplier * sens / math.sqrt(n_min))
        else:
            assert settings.epsilon is not None
            sigma = dp.plan_sigma(settings.epsilon, settings.delta, rounds, population, sample,
                                  n_min, sens, num_params, amplified=False)
        return cls(settings, device_l2, sigma, dp_noise_bound(sigma, num_params), n_min,
                   num_params)

    @property
    def budget(self) -> float | None:
        return self.settings.budget or self.settings.epsilon

    @property
    def delta(self) -> float:
        return self.settings.delta

    @property
    def sensitivity(self) -> float:
        """The sum's L2 sensitivity under replace-one (the ledger's relation)."""
        return dp.sum_sensitivity(self.device_l2)

    def codec_params(self, params: CodecParams) -> CodecParams:
        """The round's codec with the noise on (weights all 1: a device's influence on the sum
        is its clipped update, whatever its sample count)."""
        return replace(params, dp_sigma=self.sigma_device, dp_bound=self.noise_bound,
                       weight_cap=1)

    def event(self, population: int, sample: int, contributors: int) -> pb.PrivacyRound:
        """One release whose sum holds ``contributors`` devices' noise (counted as at most
        ``n_min``: rounds that met it share one record, which only over-counts)."""
        n = max(1, min(contributors, self.n_min))
        rec = dp.round_record(population, sample, n, self.sigma_device, self.sensitivity,
                              self.num_params)
        return pb.PrivacyRound(population=population, sample=sample, contributors=n,
                               noise_multiplier=rec.z_eff)

    @staticmethod
    def ledger(rounds: list[pb.PrivacyRound]) -> dp.PrivacyLedger:
        return dp.PrivacyLedger((r.population, r.sample, r.noise_multiplier) for r in rounds)

    def account(self, previous: pb.Privacy | None, population: int, sample: int,
                releases: list[int]) -> pb.Privacy:
        """The privacy spent after one more round whose decrypted sums held ``releases``
        devices each.

        One event per round, with the smallest release: when a total failed its bounds and was
        narrowed down, every decrypted sum (the total, regions, groups) is a sum of the finest
        parts decrypted, disjoint sets of devices each carrying its own devices' noise, so the
        round is post-processing of one release per part, and the smallest part binds."""
        rounds = list(previous.rounds) if previous is not None else []
        if releases:
            rounds.append(self.event(population, sample, min(releases)))
        return self.summary(rounds)

    def summary(self, rounds: list[pb.PrivacyRound]) -> pb.Privacy:
        led = self.ledger(rounds)
        eps = led.epsilon(self.delta, amplified=False)
        draws = sum(r.sample for r in rounds)
        delta = dp.redraw_delta(self.delta, min(eps, 700.0), NOISE_REDRAW_PROB, draws) \
            if math.isfinite(eps) else 1.0
        return pb.Privacy(
            mode="distributed", epsilon=eps, delta=self.delta, budget=self.budget or 0.0,
            sigma_device=self.sigma_device, sensitivity=self.sensitivity, n_min=self.n_min,
            rounds=rounds, delta_with_redraws=delta,
            epsilon_amplified=led.epsilon(self.delta) if rounds else 0.0)

    def may_run_another(self, spent: pb.Privacy, population: int, sample: int) -> bool:
        """Whether one more round at ``n_min`` devices stays within the budget."""
        if self.budget is None:
            return True
        nxt = self.event(population, sample, self.n_min)
        eps = self.ledger(list(spent.rounds)).epsilon_if(
            (nxt.population, nxt.sample, nxt.noise_multiplier), self.delta, amplified=False)
        return eps <= self.budget
