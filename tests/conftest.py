"""Shared fixtures: the shared datasets folder and tiny configs."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The folder with the real datasets (omniglot/, clinc150/), or None when absent."""
    env = os.environ.get("METASSL_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if (c / "omniglot").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = shared_data()
    if root is None:
        pytest.skip("shared Omniglot data not found: set METASSL_SHARED_DATA to the folder holding omniglot/")
    return root / "omniglot"


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the whole test session."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    # Ray Train's controller polls every 2 s by default, which makes each report() slow.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
