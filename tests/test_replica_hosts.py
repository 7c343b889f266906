"""Replicas on separate hosts (docs/scale-out.md "Past one machine"), as far as one machine allows: three network
namespaces on a private bridge, one running PostgreSQL with the ward's ledger and two running `dataward serve`. The
replicas share nothing but the ledger database, reached over the network, and the ward folder (the stand-in for the
storage every machine mounts): no loopback, no shared memory between them (SQLite's WAL needs both)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import postgres_binary
from dataward.store.move import move_ledger
from test_service_scale import forget_through_a_while_b_serves, serve_replica

SUBNET = f"10.213.{os.getpid() % 250}"  # a private /24 for this run's hosts
PORT = 8000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts():
    """Namespaces ``db``, ``a`` and ``b`` on a bridge (the test itself is 10.213.x.1); yields ``{name: (address, prefix)}``
    where ``prefix`` runs a command on that host. Skips where network namespaces cannot be made (not root, no iproute2,
    a sandbox that forbids them)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"dw{os.getpid() % 100000}"
    bridge, made, out = f"{tag}br", [], {}
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for number, name in enumerate(("db", "a", "b"), start=10):
            space, link = f"{tag}{name}", f"{tag}{name}v"
            ip("netns", "add", space)
            made.append(space)
            ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", space)
            ip("link", "set", link, "master", bridge)
            ip("link", "set", link, "up")
            for command in (["addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
                ip("netns", "exec", space, "ip", *command)
            out[name] = (f"{SUBNET}.{number}", ("ip", "netns", "exec", space))
    except subprocess.CalledProcessError as error:
        remove_hosts(made, bridge)
        pytest.skip(f"cannot make network namespaces here: {error.stderr.decode().strip()}")
    try:
        yield out
    finally:
        remove_hosts(made, bridge)


def remove_hosts(spaces: list[str], bridge: str) -> None:
    """Remove the namespaces (their veth ends go with them) and the bridge."""
    for space in spaces:
        subprocess.run(["ip", "netns", "del", space], capture_output=True)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.fixture
def ledger_host(hosts):
    """PostgreSQL on host ``db``, listening only there; yields the URL of an empty database for the ward's ledger."""
    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) are not installed: apt-get install postgresql")
    try:
        user = pwd.getpwnam("postgres")  # the server refuses to run as root
    except KeyError:
        pytest.skip("there is no postgres user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="dataward-dbhost-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    as_postgres = ["runuser", "-u", "postgres", "--"]
    address, on_db = hosts["db"]
    data = root / "data"
    try:
        subprocess.run(as_postgres + [initdb, "-D", str(data), "-A", "trust", "-U", "dataward", "--no-sync"], check=True, capture_output=True)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        subprocess.run([*on_db, *as_postgres, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
                        f"-k {root} -c listen_addresses={address} -c fsync=off"], check=True, capture_output=True)
        subprocess.run([*on_db, *as_postgres, postgres_binary("psql") or "psql", "-h", address, "-U", "dataward", "-d", "postgres",
                        "-c", "CREATE DATABASE ward"], check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as error:  # this machine cannot run one on host db
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL on host db: {getattr(error, 'stderr', b'') or error}")
    yield f"postgresql://dataward@{address}:5432/ward"
    subprocess.run([*on_db, *as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_replicas_on_two_hosts_share_a_forget_through_the_ledger_database(service_ward, tmp_path, hosts, ledger_host):
    path, keys = service_ward
    shutil.copytree(path, tmp_path / "ward")
    path = tmp_path / "ward"
    move_ledger(path, ledger_host)
    with open(tmp_path / "replicas.log", "w") as log:
        replicas = [serve_replica(path, PORT, log, *hosts[name]) for name in ("a", "b")]
        try:
            networks = {os.readlink(f"/proc/{proc.pid}/ns/net") for proc in replicas}
            assert len(networks) == 2 and os.readlink("/proc/self/ns/net") not in networks  # each on a network of its own
            forget_through_a_while_b_serves(path, keys, *(f"http://{hosts[name][0]}:{PORT}" for name in ("a", "b")))
        finally:
            for proc in replicas:
                proc.terminate()
                proc.wait(60)
