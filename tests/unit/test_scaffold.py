"""``fedstream new`` (global_aggregator.scaffold) and the examples/iot-anomaly project.

No brokers: the scaffold is written to ``tmp_path``; the projects' own packages are imported with
their directory put on ``sys.path`` for one test only (then removed, with the modules).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from global_aggregator import scaffold

REPO = Path(__file__).resolve().parents[2]
IOT = (REPO / "examples" / "iot-anomaly").resolve()
IOT_HEADER = "temperature,vibration,current,pressure,humidity,rpm,fault"
NAME, PKG = "demo-proj", "demo_proj"


@contextlib.contextmanager
def project_imports(root: Path, package: str) -> Iterator[None]:
    """Make ``root``'s own package importable for the duration of the block only."""
    entry = str(Path(root).resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        while entry in sys.path:
            sys.path.remove(entry)
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def num_params(model: nnx.Module) -> int:
    flat, _ = ravel_pytree(nnx.state(model))
    return int(flat.size)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    assert scaffold.main([NAME, "--dir", str(tmp_path)]) == 0
    return tmp_path / NAME


# --------------------------------------------------------------------------- fedstream new


def test_scaffold_writes_the_project_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert scaffold.main([NAME, "--dir", str(tmp_path)]) == 0
    project = tmp_path / NAME
    for rel in ("pyproject.toml", "README.md", f"{PKG}/__init__.py", f"{PKG}/model.py",
                f"{PKG}/data.py"):
        assert (project / rel).is_file(), rel
    out = capsys.readouterr().out
    assert f"python -m {PKG}.data --devices 4" in out
    assert "fedstream-simulate --project ." in out
    readme = (project / "README.md").read_text()
    assert f"python -m {PKG}.data --devices 4" in readme
    assert "fedstream-simulate --project ." in readme


def test_scaffold_pyproject_has_the_fedstream_table(project: Path) -> None:
    doc = tomllib.loads((project / "pyproject.toml").read_text())
    assert doc["project"]["name"] == NAME
    assert doc["project"]["version"] == "0.1.0"
    t = doc["tool"]["fedstream"]
    assert t["model"] == f"{PKG}.model:make_model"
    assert t["input_shape"] == [16]
    assert t["model_options"]["num_classes"] == 3
    assert t["loader"] == "npz"
    assert t["loader_options"]["path"] == "data/{device_id}.npz"
    fed = t["federation"]
    assert fed["rounds"] == 5
    assert set(fed["train"]) <= {"optimizer", "lr", "epochs", "batch_size", "prox_mu"}
    assert fed["train"]["lr"] > 0 and fed["train"]["epochs"] >= 1
    assert set(fed["codec"]) <= {"bits", "clip_l2", "clip_coord", "max_summands", "weight_cap",
                                 "chunk_bytes", "encrypted"}
    assert t["simulation"]["devices"] == 4 and t["simulation"]["regions"] == 2
    assert "server_eval" not in t


def test_scaffold_model_factory_builds(project: Path) -> None:
    t = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["fedstream"]
    module_name, _, attr = t["model"].partition(":")
    with project_imports(project, PKG):
        factory = getattr(importlib.import_module(module_name), attr)
        model = factory(rngs=nnx.Rngs(0), **t["model_options"])
        x = np.random.default_rng(0).normal(size=(5, *t["input_shape"])).astype(np.float32)
        out = model(x)
    assert out.shape == (5, t["model_options"]["num_classes"])
    assert np.all(np.isfinite(np.asarray(out)))
    assert PKG not in sys.modules and str(project.resolve()) not in sys.path


def test_scaffold_data_matches_input_shape(project: Path, tmp_path: Path) -> None:
    t = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["fedstream"]
    ids = ["device-000", "device-001", "device-002"]
    with project_imports(project, PKG):
        data = importlib.import_module(f"{PKG}.data")
        paths = data.make_data(ids, tmp_path / "a", 0)
        again = data.make_data(ids, tmp_path / "b", 0)
        assert data.main(["--devices", "2", "--out", str(tmp_path / "cli")]) == 0
    assert [p.name for p in paths] == [f"{i}.npz" for i in ids]
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["device-000.npz",
                                                                   "device-001.npz"]
    shape = tuple(t["input_shape"])
    classes = t["model_options"]["num_classes"]
    means = []
    for p, q in zip(paths, again):
        with np.load(p) as f, np.load(q) as g:
            assert set(f.files) == {"x_train", "y_train", "x_test", "y_test"}
            for split in ("train", "test"):
                x, y = f[f"x_{split}"], f[f"y_{split}"]
                assert x.dtype == np.float32 and x.shape[1:] == shape and len(x) > 0
                assert y.shape == (len(x),) and np.issubdtype(y.dtype, np.integer)
                assert 0 <= y.min() and y.max() < classes
                np.testing.assert_array_equal(x, g[f"x_{split}"])   # seeded
            means.append(f["x_train"].mean(0))
    assert np.linalg.norm(means[0] - means[1]) > 0.05                # devices differ


@pytest.mark.parametrize("name", ["", "1abc", "-abc", "_abc", "a b", "a.b", "a/b", "é",
                                  "x" * 65, "class", "numpy", "json", "edge_agent"])
def test_scaffold_refuses_bad_names(name: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    assert scaffold.main(["--dir", str(tmp_path), "--", name]) == 2
    assert "invalid project name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scaffold_accepts_edge_names(tmp_path: Path) -> None:
    assert scaffold.main(["x" * 64, "--dir", str(tmp_path)]) == 0
    assert scaffold.main(["A-b_9", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "A-b_9" / "A_b_9" / "model.py").is_file()


def test_scaffold_refuses_an_existing_directory(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / NAME
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert scaffold.main([NAME, "--dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    # --force writes the project's files and leaves the others alone
    assert scaffold.main([NAME, "--dir", str(tmp_path), "--force"]) == 0
    assert (target / "pyproject.toml").is_file() and (target / "notes.txt").read_text() == "mine"
    # scaffolding twice without --force is refused too
    assert scaffold.main([NAME, "--dir", str(tmp_path)]) == 2


def test_scaffold_error_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "x").write_text("")
    assert scaffold.main([NAME, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    (tmp_path / "afile").write_text("")
    assert scaffold.main(["afile", "--dir", str(tmp_path), "--force"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_scaffold_into_an_empty_directory_and_help(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    (tmp_path / NAME).mkdir()
    assert scaffold.main([NAME, "--dir", str(tmp_path)]) == 0
    with pytest.raises(SystemExit) as exc:
        scaffold.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "fedstream new" in out and "--force" in out and "--dir" in out


# --------------------------------------------------------------------------- examples/iot-anomaly


@pytest.fixture
def iot_generate() -> Iterator[ModuleType]:
    """examples/iot-anomaly/generate.py, loaded as a module (it imports iot_anomaly.data)."""
    with project_imports(IOT, "iot_anomaly"):
        spec = importlib.util.spec_from_file_location("_iot_generate", IOT / "generate.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


def read_csv(path: Path) -> tuple[str, np.ndarray]:
    lines = path.read_text().splitlines()
    return lines[0], np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def test_iot_generator_writes_one_csv_per_device(iot_generate: ModuleType,
                                                 tmp_path: Path) -> None:
    ids = iot_generate.device_ids(8)
    assert ids[0] == "device-000" and ids[-1] == "device-007"
    paths = iot_generate.generate(ids, tmp_path, 0)
    assert [p.name for p in paths] == [f"{i}.csv" for i in ids]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    tables = []
    for p in paths:
        header, table = read_csv(p)
        assert header == IOT_HEADER
        assert table.shape[1] == 7 and 600 <= table.shape[0] <= 1000
        assert np.all(np.isfinite(table))
        assert set(np.unique(table[:, 6])) <= {0, 1, 2, 3}
        assert 0.1 < np.mean(table[:, 6] > 0) < 0.8            # faults, but mostly healthy
        assert np.abs(table[:, :6].mean(0)).max() < 2.0          # standardized-ish
        tables.append(table)
    pooled = np.concatenate(tables)
    assert set(np.unique(pooled[:, 6])) == {0, 1, 2, 3}
    assert 0.3 < pooled[:, :6].std(0).min() and pooled[:, :6].std(0).max() < 2.0
    # no two devices alike: different means and different fault mixes
    means = np.array([t[:, :6].mean(0) for t in tables])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(ids), 1)]
    assert gaps.min() > 0.1
    mixes = {tuple(np.bincount(t[:, 6].astype(int), minlength=4)) for t in tables}
    assert len(mixes) == len(ids)
    # one device's rpm sensor is stuck (a constant tail), and only one
    stuck = [i for i, t in enumerate(tables) if np.ptp(t[-100:, 5]) == 0]
    assert len(stuck) == 1


def test_iot_generator_is_seeded(iot_generate: ModuleType, tmp_path: Path) -> None:
    ids = ["a", "b", "SN-00042A"]
    first = iot_generate.generate(ids, tmp_path / "1", 3)
    same = iot_generate.generate(ids, tmp_path / "2", 3)
    other = iot_generate.generate(ids, tmp_path / "3", 4)
    for p, q, r in zip(first, same, other):
        assert p.read_bytes() == q.read_bytes()
        assert p.read_bytes() != r.read_bytes()


def test_iot_generator_cli(iot_generate: ModuleType, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    assert iot_generate.main(["--ids", "x-1,x-2", "--out", str(tmp_path / "ids")]) == 0
    assert sorted(p.name for p in (tmp_path / "ids").iterdir()) == ["x-1.csv", "x-2.csv"]
    assert iot_generate.main(["--devices", "3", "--out", str(tmp_path / "n"), "--seed", "1"]) == 0
    assert len(list((tmp_path / "n").iterdir())) == 3
    with pytest.raises(SystemExit) as exc:
        iot_generate.main(["--help"])
    assert exc.value.code == 0
    assert "--devices" in capsys.readouterr().out


def test_iot_model_maps_windows_to_fault_logits() -> None:
    with project_imports(IOT, "iot_anomaly"):
        from iot_anomaly.model import make_model

        model = make_model(rngs=nnx.Rngs(0), num_classes=4)
        out = model(np.random.default_rng(0).normal(size=(7, 32, 6)).astype(np.float32))
        assert out.shape == (7, 4)
        assert np.all(np.isfinite(np.asarray(out)))
        assert num_params(model) < 10_000
        assert make_model(rngs=nnx.Rngs(0), num_classes=3)(np.zeros((2, 32, 6))).shape == (2, 3)


def test_iot_pyproject_has_the_fedstream_table() -> None:
    doc = tomllib.loads((IOT / "pyproject.toml").read_text())
    assert doc["project"]["name"] == "iot-anomaly" and doc["project"]["version"] == "0.1.0"
    t = doc["tool"]["fedstream"]
    assert t["model"] == "iot_anomaly.model:make_model"
    assert t["input_shape"] == [32, 6] and t["model_options"] == {"num_classes": 4}
    assert t["loader"] == "csv"
    assert {k: t["loader_options"][k] for k in ("path", "label", "window", "stride")} == {
        "path": "data/{device_id}.csv", "label": "fault", "window": 32, "stride": 16}
    assert t["federation"]["rounds"] == 10
    assert t["federation"]["codec"]["chunk_bytes"] == 100000
    assert t["simulation"]["devices"] == 8 and t["simulation"]["regions"] == 2
    assert "server_eval" not in t


# --------------------------------------------------------------------------- schemas.project
# These use the project loader (schemas.project.load_project) and the built-in loaders
# (edge_agent.loaders): the projects above must load as the tiers will load them.


@pytest.fixture
def unload_projects() -> Iterator[None]:
    """load_project puts a project's directory on sys.path: take it off again."""
    before = list(sys.path)
    yield
    sys.path[:] = before
    for name in [m for m in sys.modules if m.split(".")[0] in (PKG, "iot_anomaly")]:
        del sys.modules[name]


def test_project_table_loads_scaffold(project: Path, unload_projects: None) -> None:
    from schemas.project import load_project

    p = load_project(project)
    assert p.name == NAME and p.version == "0.1.0"
    assert p.input_shape == (16,)
    assert p.federation.rounds == 5
    assert p.federation.codec.chunk_bytes == 100000
    assert sum(map(len, p.table.simulation.fleet().values())) == 4


def test_project_table_loads_iot_anomaly(unload_projects: None) -> None:
    from schemas.project import load_project

    p = load_project(IOT)
    assert p.name == "iot-anomaly" and p.version == "0.1.0"
    assert p.input_shape == (32, 6)
    assert p.federation.rounds == 10
    assert p.federation.codec.chunk_bytes == 100000
    assert p.federation.train.optimizer == "momentum"
    fleet = p.table.simulation.fleet()
    assert len(fleet) == 2 and sum(map(len, fleet.values())) == 8


def test_project_table_loads_data_through_builtin_loaders(
    project: Path, tmp_path: Path, unload_projects: None
) -> None:
    """The demo-data function each project names writes what its built-in loader reads."""
    from edge_agent.loaders import DeviceContext, device_options, load_device_data, resolve_loader
    from edge_agent.models import resolve
    from schemas.project import load_project

    for root in (project, IOT):
        p = load_project(root)
        assert p.table.simulation.data is not None
        out = tmp_path / p.name
        options = dict(p.table.loader_options, path=str(out / "{device_id}.") + p.table.loader)
        ids = [d for ds in p.table.simulation.fleet().values() for d in ds][:2]
        resolve(p.table.simulation.data, "demo data")(ids, out, 0)
        loader = resolve_loader(p.table.loader)
        for d in ids:
            ctx = DeviceContext(device_id=d, region="region-0", root=p.root,
                                options=device_options(options, {}, device_id=d,
                                                       region="region-0"))
            data = load_device_data(loader, ctx, p.input_shape)
            assert data.x_train.shape[1:] == p.input_shape and len(data.x_train) > 10
            assert data.x_test.shape[1:] == p.input_shape and len(data.x_test) > 0
