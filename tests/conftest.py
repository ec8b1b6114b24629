"""Shared fixtures: small synthetic CIFAR-10 files, a fresh MLflow store, test plugins."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.pop("MLFLOW_RUN_ID", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Learnable fake CIFAR: each class is a fixed random template plus noise, as uint8 (n, 3072)."""
    templates = np.random.default_rng(1234).uniform(40, 215, size=(10, 3072))
    rng = np.random.default_rng(seed)
    labels = [int(i % 10) for i in range(n)]
    rng.shuffle(labels)
    noise = rng.normal(0, 25, size=(n, 3072))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar_layout(root: Path, per_batch: int = 200, test: int = 200) -> Path:
    """The cifar-10-batches-py layout, pickled as the original is, under ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", per_batch, i) for i in range(1, 6)] + [("test_batch", test, 99)]
    for name, n, seed in batches:
        data, labels = synthetic_images(n, seed)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data dir holding small synthetic CIFAR-10 files (200 images per batch)."""
    root = tmp_path_factory.mktemp("data")
    write_cifar_layout(root)
    return root


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session (creating one takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own working directory, where mlflow.db and mlruns/ would land.

    mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI (and set_experiment
    MLFLOW_EXPERIMENT_ID); keep tests, and the `mlflow run` they start, from seeing each other's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


@pytest.fixture
def in_tmp(tmp_path) -> Path:
    """The test's working directory (every test gets its own, see ``isolated``)."""
    return tmp_path


@pytest.fixture
def register_plugin():
    """Register a plugin object with the process-wide registry for one test."""
    from cifarx.plugin_api.registry import registry

    names = []

    def register(plugin, name="test-plugin"):
        registry().register(plugin, name=name)
        names.append(name)
        return plugin

    yield register
    for name in names:
        registry().unregister(name)
