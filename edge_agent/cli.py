"""``fedstream-edge-agent``: one device of the fleet (settings: :class:`EdgeSettings`)."""

from __future__ import annotations

from edge_agent.service import EdgeAgent, EdgeSettings
from schemas.cli import run


def main(argv: list[str] | None = None) -> None:
    run(EdgeSettings, EdgeAgent, argv, prog="fedstream-edge-agent")


if __name__ == "__main__":
    main()
