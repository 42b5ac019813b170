"""Shared set-up: a private home for the whole session, the shared datasets, a local S3 server, one Ray instance.

Every test session runs in its own temporary folder, made when pytest starts and removed when it ends: `HOME`,
the XDG, torch and matplotlib caches, metassl's data and run caches, Ray's temp folder and Ray's authentication
token all point into it. No test reads a file that an earlier run left behind, nor writes into the real home.
"""
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray puts Unix sockets at $RAY_TMPDIR/ray/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (up to 68 bytes
# after $RAY_TMPDIR) and a socket path must fit in 107 bytes, so RAY_TMPDIR may be at most this long.
MAX_RAY_TMPDIR_BYTES = 39

# Removed for the session: they would send tests to the caller's cluster, credentials or splits policy.
_CLEARED = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "METASSL_FORBIDDEN_SPLITS")
_ROOT = pytest.StashKey[Path]()
_SAVED_ENV = pytest.StashKey[dict]()


def short_temp_base() -> Path:
    """The system's temporary folder with the shortest path: /tmp on POSIX (as Ray itself uses), else tempfile's."""
    tmp = Path("/tmp")
    if os.name == "posix" and tmp.is_dir() and os.access(tmp, os.W_OK | os.X_OK):
        return tmp
    return Path(tempfile.gettempdir())


def check_ray_tmpdir(path: Path) -> Path:
    """Returns `path` when it is short enough to be a RAY_TMPDIR; raises pytest.UsageError naming it otherwise."""
    size = len(os.fsencode(path))
    if size > MAX_RAY_TMPDIR_BYTES:
        raise pytest.UsageError(f"temporary folder {str(path)!r} is {size} bytes long, but Ray's socket paths allow "
                                f"a RAY_TMPDIR of at most {MAX_RAY_TMPDIR_BYTES}: make /tmp writable or set TMPDIR "
                                f"to a shorter folder")
    return path


def short_temp_dir(parent: Path, prefix: str = "") -> Path:
    """A new empty folder under `parent` whose path is short enough to be a RAY_TMPDIR."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        return check_ray_tmpdir(path)
    except pytest.UsageError:
        shutil.rmtree(path, ignore_errors=True)
        raise


def isolated_environment(root: Path) -> dict[str, str]:
    """The variables that point every home, cache and Ray folder of a test session into `root`."""
    home = root / "home"
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "TORCH_HOME": str(home / ".cache" / "torch"),
        "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
        "METASSL_DATA": str(root / "data"),  # default dataset folder (downloads)
        "METASSL_CACHE": str(root / "cache"),  # local mirrors of remote run directories
        "RAY_TMPDIR": str(root / "ray"),
        # Ray turns token authentication on for a new local cluster; every process of the session (the
        # in-process instance, `ray` commands, CLI subprocesses) reads the token from $HOME/.ray/auth_token.
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train's controller polls every 2 s by default, which makes each report() slow.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    }


def write_auth_token(home: Path) -> Path:
    """Writes a new random Ray token where Ray looks by default ($HOME/.ray/auth_token), readable by us only."""
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    return path


def pytest_configure(config):
    """Points the session at a fresh private folder before any test module (or torch, Ray) is imported."""
    root = Path(tempfile.mkdtemp(prefix="metassl-", dir=short_temp_base()))
    env = isolated_environment(root)
    try:
        check_ray_tmpdir(Path(env["RAY_TMPDIR"]))
    except pytest.UsageError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    for key in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "METASSL_DATA", "METASSL_CACHE", "RAY_TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    write_auth_token(Path(env["HOME"]))
    config.stash[_SAVED_ENV] = {k: os.environ.get(k) for k in (*env, *_CLEARED)}
    config.stash[_ROOT] = root
    for key in _CLEARED:
        os.environ.pop(key, None)
    os.environ.update(env)


def pytest_unconfigure(config):
    """Restores the caller's environment and removes the session's folder."""
    for key, value in config.stash.get(_SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    root = config.stash.get(_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def short_tmp_path(pytestconfig) -> Path:
    """A fresh folder for this test with a path short enough to be the RAY_TMPDIR of a Ray instance it starts."""
    path = short_temp_dir(pytestconfig.stash[_ROOT])
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
def speech_root() -> Path:
    root = shared_data()
    if root is None or not (root / "arabic_speech_commands" / "asc_8k.npz").is_file():
        pytest.skip("shared Arabic Speech Commands not found: set METASSL_SHARED_DATA to the folder holding "
                    "arabic_speech_commands/")
    return root / "arabic_speech_commands"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) on 127.0.0.1 with its bucket "metassl", or None without moto.

    Started before Ray so that Ray's workers inherit the endpoint and the test credentials.
    """
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
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
def ray_session(s3_endpoint):
    """One local Ray instance (2 CPUs) for the whole test session, in the session's RAY_TMPDIR."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # the dashboard serves the state API that Ray Train's placement-group cleaner needs
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        # Ray's state API (Ray Train's placement-group cleaner calls it from inside the cluster) finds its cluster
        # in $RAY_TMPDIR/ray/ray_current_cluster, which `ray start` writes and ray.init does not; without it, it
        # refuses as soon as another Ray instance runs on this machine. Record this one as `ray start` would.
        from ray._private.utils import write_ray_address

        write_ray_address(ray.get_runtime_context().gcs_address)
    yield ray
    ray.shutdown()
