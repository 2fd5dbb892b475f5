"""Shared fixtures for the training and export tests.

* ``tiny_config(model_type, **overrides)`` builds a small synthetic config (150 users,
  ``max_seq_len`` 10, one epoch, narrow MLPs). Overrides use ``__`` for nesting:
  ``tiny_config("din", model__activation="prelu", train__epochs=2)``.
* ``tiny_prep`` is the prepared (split, mapped, encoded) data of that config. The data
  do not depend on the model type, so every model type trains on this one object.
* ``trained(model_type)`` trains a model type once per session (through
  ``training.train.train``) and reloads it from its run folder (``load_run``).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctr.spec import MODEL_READS, FeatureConfig
from tests.helpers import missing

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# the longest test files, longest first (--durations=0 under scripts/test.sh): where
# pytest-xdist spreads whole files over workers (--dist loadfile --no-loadscope-reorder)
# they go out first, so that no worker starts a long one while the other has finished
LONG_FILES = (
    "test_stack.py", "test_workers.py", "test_cli.py", "test_bench.py", "test_train.py",
    "test_fused.py", "test_reliability.py", "test_packaging.py", "test_reload_bus.py",
    "test_runtime.py", "test_container_commands.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the files of :data:`LONG_FILES` first (a stable sort:
    each file's tests keep their order); a run in one process keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    """One torch intra-op thread: the test machines have few, shared cores, and two
    spinning OpenMP threads there made small recurrent models ~10x slower."""
    try:
        import torch
    except ImportError:  # the torch-free runtime image
        return
    torch.set_num_threads(1)


def tiny_raw(model_type: str = "din", **overrides: Any) -> dict[str, Any]:
    """The raw (YAML-shaped) dict of a small synthetic config."""
    raw = yaml.safe_load((CONFIGS / "synthetic_din.yaml").read_text())
    raw["name"] = f"tiny_{model_type}"
    raw["max_seq_len"] = 10
    raw["model"] = {
        "type": model_type,
        "mlp": [32, 16],
        "tower_mlp": [16],
        "attention_mlp": [16, 8],
        "gru_dim": 12,
        "activation": "dice",
    }
    # only what the type reads: the rest would be warned
    raw["model"] = {k: v for k, v in raw["model"].items() if k in MODEL_READS[model_type]}
    raw["train"] = {
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.005,
        "seed": 42,
        "patience": 1,
        "threads": 1,
    }
    raw["data"]["options"] = {"n_users": 150, "samples_per_user": 4}
    for key, value in overrides.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)
    return raw


def make_tiny_config(model_type: str = "din", **overrides: Any) -> FeatureConfig:
    return FeatureConfig.model_validate(tiny_raw(model_type, **overrides))


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., FeatureConfig]:
    """Factory: ``tiny_config(model_type="din", **overrides) -> FeatureConfig``."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_prep() -> Any:
    from training.dataset import prepare

    return prepare(make_tiny_config("din"))


@dataclass
class TrainedRun:
    config: FeatureConfig
    prep: Any  # training.dataset.Prepared (fitted mapper, encoded splits)
    model: Any  # training.models.CTRModel, reloaded from run_dir, eval mode
    mapper: Any  # the mapper as saved in the run folder
    metrics: dict[str, Any]
    run_dir: Path


@pytest.fixture(scope="session")
def trained(
    tiny_prep: Any, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], TrainedRun]:
    """Factory: ``trained(model_type) -> TrainedRun``; each type trains once per session."""
    from training.train import load_run, train

    cache: dict[str, TrainedRun] = {}

    def get(model_type: str) -> TrainedRun:
        if model_type not in cache:
            config = make_tiny_config(model_type)
            run_dir = tmp_path_factory.mktemp(f"run_{model_type}")
            train(config, run_dir, prep=tiny_prep, progress=False)
            cfg, mapper, model, metrics = load_run(run_dir)
            cache[model_type] = TrainedRun(cfg, tiny_prep, model, mapper, metrics, run_dir)
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def lib() -> Any:
    """The custom-op library built from ``native/`` for this machine (``ctr.native``);
    skips where no C++ compiler can build it."""
    from ctr import native

    try:
        return native.library()
    except native.NativeError as exc:
        if "no C++ compiler" in str(exc):
            missing(str(exc))
        raise


@pytest.fixture(scope="session")
def ops_levels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prebuilt custom-op folder (``ctr build-ops --arch ... --out DIR``) with every
    level this CPU can run (x86-64-v4/v3/v2 as supported, and generic), built once per
    session from the sources into a fresh cache, so each level is really compiled."""
    from ctr import native
    from ctr.cli import main

    tmp = tmp_path_factory.mktemp("ops-levels")
    levels = native.supported_levels()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTR_OPS_CACHE", str(tmp / "cache"))
        mp.delenv("CTR_OPS_CXX_ARCH", raising=False)
        rc = main(["build-ops", "--cuda", "no", "--arch", ",".join(levels), "--out",
                   str(tmp / "ops")])  # fmt: skip
    if rc != 0 and not (shutil.which("g++") or shutil.which("c++")):
        missing("no C++ compiler to build the custom-op library")
    assert rc == 0
    return tmp / "ops"
