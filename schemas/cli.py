"""Shared entry-point plumbing: flags that default to environment variables, logging, signals.

Configuration is read here, at the edge of the program, and nowhere else (a Kubernetes Deployment
sets the environment; a person passes flags; flags win).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Any


class EnvDefaults(argparse.ArgumentParser):
    """An ArgumentParser whose ``env=`` option keyword makes an environment variable the default."""

    def add_argument(self, *args: Any, env: str | None = None, **kw: Any):  # type: ignore[override]
        if env is not None:
            kw["help"] = f"{kw.get('help', '')} [env {env}]".strip()
            if env in os.environ:
                raw = os.environ[env]
                typ = kw.get("type", str)
                kw["default"] = raw.lower() in ("1", "true", "yes") if kw.get("action") == \
                    "store_true" else typ(raw)
                kw["required"] = False
        return super().add_argument(*args, **kw)


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def run_service(main: Callable[[], Any], stop: Callable[[], None]) -> None:
    """Run ``main()`` on an event loop; SIGTERM and SIGINT call ``stop`` for a clean exit."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await main()

    asyncio.run(runner())
