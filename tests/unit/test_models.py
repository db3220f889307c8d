"""Models, data sets and partitioners of the edge agent."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from edge_agent.models import MODELS, apply, init_params, make_spec, model_spec
from global_aggregator.datasets import (
    TASKS,
    TELEMETRY_CLASSES,
    agent_dataset,
    generate_telemetry,
    load_digits_split,
    load_telemetry_split,
    server_test_set,
)
from global_aggregator.partition import assign_regions, partition_indices


@pytest.mark.parametrize(("name", "shape", "classes"), [("digits_cnn", (8, 8, 1), 10), ("mlp", 12, 4)])
def test_init_params_is_one_float32_vector_and_apply_gives_logits(name, shape, classes):
    flat, spec = init_params(name, shape, classes, seed=0)

    logits = jax.jit(apply, static_argnums=0)(spec, flat, np.zeros((5, *spec.input_shape)))

    assert flat.dtype == np.float32 and flat.ndim == 1 and flat.size == spec.num_params
    assert logits.shape == (5, classes)


def test_digits_cnn_is_small():
    flat, _ = init_params("digits_cnn", (8, 8, 1), 10, seed=0)
    assert 10_000 <= flat.size <= 30_000


def test_init_is_deterministic_per_seed():
    a, _ = init_params("digits_cnn", (8, 8, 1), 10, seed=3)
    b, _ = init_params("digits_cnn", (8, 8, 1), 10, seed=3)
    c, _ = init_params("digits_cnn", (8, 8, 1), 10, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_spec_rebuilds_from_name_and_shapes_alone():
    flat, spec = init_params("mlp", 12, 4, seed=1)
    x = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)

    rebuilt = model_spec(spec.factory, list(spec.input_shape), dict(spec.options))

    assert rebuilt == spec and hash(rebuilt) == hash(spec)
    assert np.array_equal(apply(rebuilt, flat, x), apply(spec, flat, x))


def test_unknown_model_and_wrong_vector_are_refused():
    flat, spec = init_params("mlp", 12, 4, seed=1)
    with pytest.raises(ValueError):
        make_spec("resnet", 12, 4)
    with pytest.raises(ValueError):
        apply(spec, flat[:-1], np.zeros((1, 12)))
    assert set(MODELS) >= {"mlp", "digits_cnn"}


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_partitions_are_disjoint_cover_and_deterministic(partition):
    labels = np.random.default_rng(0).integers(0, 10, 1000)

    parts = partition_indices(labels, 20, partition, alpha=0.5, seed=7)
    again = partition_indices(labels, 20, partition, alpha=0.5, seed=7)

    assert len(parts) == 20
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    labels = np.repeat(np.arange(10), 100)

    def mean_classes(partition: str) -> float:
        parts = partition_indices(labels, 20, partition, alpha=0.1, seed=0)
        return float(np.mean([len(np.unique(labels[p])) for p in parts]))

    assert mean_classes("dirichlet") < 0.6 * mean_classes("iid")


def test_quantity_skew_varies_sizes():
    parts = partition_indices(np.zeros(1000, int), 10, "quantity", alpha=0.5, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 3 * min(sizes)


def test_assign_regions_contiguous_and_balanced():
    assert assign_regions(20, 4) == [i // 5 for i in range(20)]
    with pytest.raises(ValueError):
        assign_regions(3, 4)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_agent_dataset_is_deterministic_and_shards_disjoint(task):
    shards = [agent_dataset(task, i, 10, "dirichlet", 0.5, seed=0) for i in range(10)]
    again = agent_dataset(task, 3, 10, "dirichlet", 0.5, seed=0)
    x_test, y_test = server_test_set(task, seed=0)

    assert all(np.array_equal(a, b) for a, b in zip(shards[3], again, strict=True))
    info = TASKS[task]
    assert shards[0][0].shape[1:] == info.input_shape and shards[0][0].dtype == np.float32
    assert x_test.shape[1:] == info.input_shape
    # the shards (local train + local test) together are exactly the training pool
    pool_y = (load_digits_split if task == "digits" else load_telemetry_split)(0)[1]
    all_y = np.concatenate([np.concatenate([s[1], s[3]]) for s in shards])
    assert len(all_y) == len(pool_y)
    assert np.array_equal(np.bincount(all_y), np.bincount(pool_y))
    assert set(np.unique(y_test)) == set(range(info.num_classes))


def test_telemetry_has_all_fault_classes_and_device_drift():
    x, y, dev = generate_telemetry(num_devices=10, samples_per_device=50, seed=1)

    assert x.shape == (500, 12) and set(np.unique(y)) == set(range(len(TELEMETRY_CLASSES)))
    normal0 = x[(dev == 0) & (y == 0), 0]
    normal1 = x[(dev == 1) & (y == 0), 0]
    assert abs(normal0.mean() - normal1.mean()) > 0.1  # device-specific baselines differ


def test_model_hash_is_the_computation_not_the_spelling(tmp_path):
    """Three installs of a project module ``fedmodel``: one with an edited comment, one with
    another activation (same parameter shapes). Each hash is computed in a fresh process (no code
    crosses the wire: the hash is how a device proves it runs the federation's model)."""
    import subprocess
    import sys

    hashes = {}
    for name, act in (("relu", "relu"), ("relu_commented", "relu"), ("gelu", "gelu")):
        d = tmp_path / name
        d.mkdir()
        comment = "# an edited comment\n" if "commented" in name else ""
        (d / "fedmodel.py").write_text(
            f"{comment}from flax import nnx\n\n"
            "class M(nnx.Module):\n"
            "    def __init__(self, rngs):\n"
            "        self.a = nnx.Linear(4, 8, rngs=rngs)\n"
            "        self.b = nnx.Linear(8, 2, rngs=rngs)\n"
            f"    def __call__(self, x):\n        return self.b(nnx.{act}(self.a(x)))\n\n"
            "def make(*, rngs):\n    return M(rngs)\n")
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from edge_agent.models import "
                "model_hash, model_spec; print(model_hash(model_spec('fedmodel:make', (4,))), "
                "model_hash(model_spec('fedmodel:make', (4,), loss='mse')))")
        hashes[name] = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True,
                                      text=True, check=True).stdout.split()
    assert hashes["relu"] == hashes["relu_commented"]
    assert hashes["relu"][0] != hashes["gelu"][0]
    assert hashes["relu"][0] != hashes["relu"][1]  # another loss is another federation


def test_a_factory_that_is_not_a_model_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "notmodel.py").write_text("def make(*, rngs):\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="not a flax.nnx.Module"):
        model_spec("notmodel:make", (4,))
    with pytest.raises(ValueError, match="cannot import"):
        model_spec("notmodel:missing", (4,))
    with pytest.raises(ValueError, match="package.module:attribute"):
        model_spec("notmodel", (4,))
