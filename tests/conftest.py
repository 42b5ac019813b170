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
def s3_endpoint(tmp_path_factory):
    """A local S3-compatible server (moto) on 127.0.0.1 with its bucket "metassl", or None without moto.

    Started before Ray so that Ray's workers inherit the endpoint and the test credentials.
    """
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="metassl")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, s3_endpoint):
    """One local Ray instance (2 CPUs) for the whole test session."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    os.environ.setdefault("METASSL_CACHE", str(tmp_path_factory.mktemp("cache")))  # mirrors of remote runs
    # Ray Train's controller polls every 2 s by default, which makes each report() slow.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        # the dashboard serves the state API that Ray Train's placement-group cleaner needs
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
