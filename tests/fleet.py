"""A local fleet on loopback: `make fleet` (``python -m tests.fleet``), its test and ``bench/fleet.py``.

One throwaway PostgreSQL cluster (:func:`tests.postgres.postgres_cluster`: initdb under ``/tmp``,
Unix socket only), one moto server standing in for S3 and EC2 (:func:`tests.servers.moto_server`) and
N appliances, each an ``imaging serve`` and an ``imaging worker`` in process groups of their own,
with a state directory and a port of its own, one shared volume directory and ``store.url`` naming
the one database. Every appliance has the same API key pair (account ``local``, ``role: admin``), so
a client may talk to any of them, as behind a load balancer.

:func:`running_fleet` starts it and stops it (every process group it started, by its id, then the
cluster, whose directory it removes); :func:`main` prints the endpoints and credentials, writes
``fleet.json`` (endpoints, process ids, the cluster directory) beside the appliances and waits for
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.cli.config import LOCAL_ACCOUNT, generate_credentials, local_config
from tests.postgres import Cluster, postgres_cluster
from tests.servers import REGION, MotoServer, free_port, moto_server, wait_for_http
from tests.stallproxy import StallingProxy

#: the database the fleet's appliances share (in the throwaway cluster)
DATABASE = "imaging"


@dataclass
class Member:
    """One appliance of the fleet: its directory, configuration, endpoint and processes."""

    number: int
    dir: Path
    config: Path
    endpoint: str
    serve: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> subprocess.Popen[bytes]:
        """(Re)start this appliance's ``imaging worker`` in a process group of its own."""
        self.worker = _spawn(self.config, "worker", self.dir / "worker.log")
        return self.worker

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (self.serve, self.worker) if p is not None]


@dataclass
class Fleet:
    root: Path
    cluster: Cluster
    moto: MotoServer
    store_url: str
    credentials: dict[str, str]
    members: list[Member] = field(default_factory=list)
    #: the proxy every S3 read of the appliances goes through (``running_fleet(proxy=True)``), or None
    proxy: StallingProxy | None = None

    def postmaster_pid(self) -> int:
        """The PostgreSQL server's process id (first line of its ``postmaster.pid``)."""
        return int((self.cluster.data / "postmaster.pid").read_text().split()[0])

    def describe(self) -> dict[str, Any]:
        """What ``fleet.json`` holds: endpoints, process ids and the directories to check."""
        return {
            "root": str(self.root),
            "cluster_dir": str(self.cluster.root),
            "store_url": self.store_url,
            "moto": {"endpoint": self.moto.endpoint, "pid": self.moto.pid},
            "postmaster_pid": self.postmaster_pid(),
            "region": REGION,
            "credentials": self.credentials,
            "appliances": [
                {
                    "endpoint": m.endpoint,
                    "dir": str(m.dir),
                    "serve_pid": m.serve.pid if m.serve else None,
                    "worker_pid": m.worker.pid if m.worker else None,
                }
                for m in self.members
            ],
        }


def _spawn(config: Path, command: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "-c", str(config), command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: stopped (or killed) as one
        )


def stop_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the process group ``proc`` leads (it started it: ``start_new_session``), SIGKILL
    whatever is left of it after ``grace`` seconds; reap ``proc``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # the group may outlive its leader (a task's children): end what is left of it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def appliance_config(
    state_dir: Path,
    port: int,
    store_url: str,
    volumes: Path,
    moto: str,
    credentials: dict[str, str],
    lease: int,
    *,
    s3_endpoint: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration of one member: ``imaging config init --store … --shared-volumes …``'s, with
    the fleet's one key pair, two API workers and the lease ``lease`` seconds long. ``s3_endpoint``:
    the appliance reads S3 there (a proxy in front of ``moto``, which stays allowed too);
    ``settings``: sections merged over the result, key by key (e.g. ``{"tasks": {"max_active": 20}}``)."""
    data = local_config(
        str(state_dir),
        f"127.0.0.1:{port}",
        s3_endpoint=s3_endpoint or moto,
        store=store_url,
        shared_volumes=str(volumes),
    )
    if s3_endpoint:
        data["sources"]["allowed_endpoints"].append(moto)
    data["api"]["credentials"] = [credentials | {"account": LOCAL_ACCOUNT, "role": "admin"}]
    data["api"]["workers"] = 2
    data["worker"] = {"lease_seconds": lease}
    for section, values in (settings or {}).items():
        data[section] = {**data.get(section, {}), **values}
    return data


@contextmanager
def running_fleet(
    root: Path,
    appliances: int = 3,
    lease: int = 60,
    *,
    settings: dict[str, Any] | None = None,
    member_settings: Callable[[int], dict[str, Any]] | None = None,
    proxy: bool = False,
) -> Iterator[Fleet]:
    """Start the fleet under ``root`` (see the module docstring); stop every process group it
    started, then the cluster (its directory removed). ``settings``: configuration sections merged
    into every appliance's (:func:`appliance_config`), then ``member_settings(number)``'s (e.g. a
    ``controller`` section with each appliance's own ``appliance_id``); ``proxy``: every S3 read of
    the appliances goes through a :class:`~tests.stallproxy.StallingProxy` in front of moto
    (``Fleet.proxy``), so a test can hold a download, or a conversion fed by one, at a chosen byte."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    volumes = root / "volumes"
    volumes.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(postgres_cluster(synchronous_commit=True))
        moto = stack.enter_context(moto_server(logs))
        front = stack.enter_context(StallingProxy(moto.endpoint)) if proxy else None
        cluster.admin(f"CREATE DATABASE {DATABASE}")
        fleet = Fleet(root, cluster, moto, cluster.url(DATABASE), generate_credentials(), proxy=front)
        try:
            for number in range(1, appliances + 1):
                home = root / f"appliance{number}"
                home.mkdir(exist_ok=True)
                port = free_port()
                config = home / "imaging.yaml"
                data = appliance_config(
                    home / "state",
                    port,
                    fleet.store_url,
                    volumes,
                    moto.endpoint,
                    fleet.credentials,
                    lease,
                    s3_endpoint=front.endpoint if front is not None else None,
                    settings={**(settings or {}), **(member_settings(number) if member_settings else {})},
                )
                config.write_text(yaml.safe_dump(data, sort_keys=False))
                config.chmod(0o600)
                member = Member(number, home, config, f"http://127.0.0.1:{port}")
                fleet.members.append(member)
                member.serve = _spawn(config, "serve", home / "serve.log")
                member.start_worker()
            for member in fleet.members:
                wait_for_http(f"{member.endpoint}/v1/health", timeout=120, proc=member.serve)
            yield fleet
        finally:
            for member in fleet.members:
                for proc in member.processes():
                    stop_group(proc)


def banner(fleet: Fleet, aws: str) -> str:
    """What `make fleet` prints once the fleet answers."""
    first = fleet.members[0].endpoint
    lines = [
        f"Imaging fleet: {len(fleet.members)} appliances sharing one PostgreSQL database",
        f"  store.url:   {fleet.store_url}",
        f"  moto S3/EC2: {fleet.moto.endpoint}",
    ]
    for m in fleet.members:
        lines.append(f"  appliance {m.number}: {m.endpoint}  (EC2 API at /, admin API at /v1; {m.dir})")
    lines += [
        f"Every appliance takes the same key pair (account {LOCAL_ACCOUNT}, role admin):",
        f"  export AWS_ACCESS_KEY_ID={fleet.credentials['access_key']}",
        f"  export AWS_SECRET_ACCESS_KEY='{fleet.credentials['secret_key']}'",
        f"  export AWS_DEFAULT_REGION={REGION}",
        "Then e.g.:",
        f"  {aws} ec2 describe-conversion-tasks --endpoint-url {first}",
        f"Logs under {fleet.root / 'logs'} and each appliance's directory; endpoints and process ids in "
        f"{fleet.root / 'fleet.json'}.",
        "Ctrl-C stops everything and removes the database.",
    ]
    return "\n".join(lines)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    # once: a second Ctrl-C must not cut the clean-up short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        help="where the appliances live (default: a new one under /tmp, removed at the end)",
    )
    parser.add_argument("--appliances", type=int, default=3)
    parser.add_argument("--lease", type=int, default=60, help="worker.lease_seconds (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep the appliances' directory (logs)")
    args = parser.parse_args(argv)
    # a directory this run made goes at the end (unless --keep); one that was there stays
    made = args.dir is None or not args.dir.exists()
    root = args.dir.resolve() if args.dir else Path(tempfile.mkdtemp(prefix="imaging-fleet-", dir="/tmp"))
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    aws = str(Path(sys.executable).parent / "aws")
    try:
        with running_fleet(root, args.appliances, args.lease) as fleet:
            (root / "fleet.json").write_text(json.dumps(fleet.describe(), indent=2))
            print(banner(fleet, aws), flush=True)
            while True:
                time.sleep(3600)
    except _Stop as stop:
        print(f"\n{stop}: stopped the fleet", flush=True)
    finally:
        if made and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
