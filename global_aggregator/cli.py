"""``fedstream-global-aggregator``: the round coordinator (settings: :class:`GlobalSettings`)."""

from __future__ import annotations

from global_aggregator.service import GlobalAggregator, GlobalSettings
from schemas.cli import run


def main(argv: list[str] | None = None) -> None:
    run(GlobalSettings, GlobalAggregator, argv, prog="fedstream-global-aggregator")


if __name__ == "__main__":
    main()
