"""A federation is a Python project: the ``[tool.fedstream]`` table of its ``pyproject.toml`` (or
a ``fedstream.toml`` with the same keys at top level). See docs/projects.md.

:func:`load_project` reads and checks the table (every key typed; an unknown key is an error, so a
typo never silently falls back to a default) and puts the project directory first on
``sys.path`` so that its own package imports. This module only reads configuration: the model,
loss and loader it names are imported by the tiers that use them
(:func:`edge_agent.models.project_spec`, :func:`edge_agent.loaders.resolve_loader`).

Example:
    >>> p = load_project("examples/digits")
    >>> p.name, p.federation.rounds, p.table.loader
    ('digits', 15, 'npz')
"""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.settings import FederationSettings

#: A device id is the fleet's own (serial numbers and the like); it becomes part of MQTT topics.
DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    return device_id


class SimulationTable(BaseModel):
    """``[tool.fedstream.simulation]``: the fleet that ``fedstream-simulate`` and the demo run."""

    model_config = ConfigDict(extra="forbid")

    devices: int | list[str] = Field(4, description="a count (ids device-000...) or the ids")
    regions: int = Field(2, ge=1, description="regions, contiguous blocks of the sorted ids")
    data: str | None = Field(
        None, description="'module:function' (ids, out_dir, seed) that writes demo data for "
        "the simulated devices where the loader_options expect it (make demo calls it)")

    def fleet(self) -> dict[str, list[str]]:
        """Region -> its devices (sorted ids, contiguous blocks, as evenly as possible)."""
        ids = ([f"device-{i:03d}" for i in range(self.devices)]
               if isinstance(self.devices, int) else sorted(self.devices))
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("simulation.devices must name at least one device, each once")
        for d in ids:
            check_device_id(d)
        return contiguous_fleet(ids, self.regions)


def contiguous_fleet(ids: list[str], regions: int) -> dict[str, list[str]]:
    """``region-<r>`` -> its devices: contiguous, balanced blocks of ``ids`` (device i of N goes
    to region i * R // N), the assignment of the simulation and of ``fedstream-keygen``."""
    n, r = len(ids), min(regions, len(ids))
    out: dict[str, list[str]] = {f"region-{k}": [] for k in range(r)}
    for i, d in enumerate(ids):
        out[f"region-{i * r // n}"].append(d)
    return out


class ProjectTable(BaseModel):
    """The keys of ``[tool.fedstream]``."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # default: [project].name
    version: str | None = None  # default: [project].version
    model: str = Field(description="factory 'package.module:function' returning an nnx.Module")
    input_shape: list[int] = Field(min_length=1, description="one example's shape")
    model_options: dict[str, Any] = {}
    loss: str = "softmax_cross_entropy"
    metrics: list[str] = ["accuracy"]
    loader: str = "npz"
    loader_options: dict[str, Any] = {}
    server_eval: str | None = None
    federation: dict[str, Any] = {}
    simulation: SimulationTable = SimulationTable()


@dataclass(frozen=True)
class Project:
    """A loaded project: where it lives, its name and version, its table and its settings."""

    root: Path
    name: str
    version: str
    table: ProjectTable
    federation: FederationSettings

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.table.input_shape)

    @property
    def federation_table(self) -> dict[str, Any]:
        """The raw ``federation`` table: the lowest-precedence source of a service's settings."""
        return dict(self.table.federation)


def _read(root: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    for fname in ("fedstream.toml", "pyproject.toml"):
        f = root / fname
        if not f.is_file():
            continue
        try:
            doc = tomllib.loads(f.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{f}: not valid TOML: {exc}") from exc
        if fname == "fedstream.toml":
            return f, doc, {}
        if "fedstream" in doc.get("tool", {}):
            return f, doc["tool"]["fedstream"], doc.get("project", {})
    raise ValueError(f"{root} is not a fedstream project: no fedstream.toml and no "
                     "[tool.fedstream] table in pyproject.toml (start one with `fedstream new`)")


def load_project(path: str | Path) -> Project:
    """Read and check the project at ``path`` (a directory or its TOML file) and make its own
    package importable. Raises ``ValueError`` saying which file and key are wrong."""
    root = Path(path).resolve()
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise ValueError(f"project directory {root} does not exist")
    f, raw, meta = _read(root)
    try:
        table = ProjectTable.model_validate(raw)
        federation = FederationSettings.model_validate(table.federation)
    except ValidationError as exc:
        raise ValueError(f"{f}: the fedstream table is invalid:\n{exc}") from None
    name = table.name or meta.get("name") or root.name
    if not PROJECT_NAME.fullmatch(name):
        raise ValueError(f"{f}: project name {name!r} must match {PROJECT_NAME.pattern}")
    version = str(table.version or meta.get("version") or "0")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return Project(root=root, name=name, version=version, table=table, federation=federation)


def task_hash(project_name: str, model_hash: str, plan_digest: bytes) -> str:
    """What a round task and a device must agree on: the project, its model definition
    (:func:`edge_agent.models.model_hash`) and the round's codec plan (the codec's 8-byte digest,
    which also covers fedstream's codec version and the model's parameter count)."""
    src = f"fedstream-task\0{project_name}\0{model_hash}\0{plan_digest.hex()}".encode()
    return hashlib.sha256(src).hexdigest()[:32]
