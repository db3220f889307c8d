"""``fedstream-regional-aggregator``: the summing service of one region (settings:
:class:`RegionalSettings`)."""

from __future__ import annotations

from regional_aggregator.service import RegionalAggregator, RegionalSettings
from schemas.cli import run


def main(argv: list[str] | None = None) -> None:
    run(RegionalSettings, RegionalAggregator, argv, prog="fedstream-regional-aggregator")


if __name__ == "__main__":
    main()
