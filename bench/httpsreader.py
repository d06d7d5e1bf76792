#!/usr/bin/env python3
"""What TLS handshakes cost the ranged reader: an https import read through the reader, timed.

One file of ``--size`` random bytes is served over https by ``bench/rangeserver.py --tls`` (a process
of its own, a self-signed certificate made here for ``imaging.test``, pinned to 127.0.0.1 by the URL
policy's resolver) and read ``--runs`` times with :func:`appliance.sources.reader.open_reader`
(``--parallel`` ranges of ``--range-size`` in flight, ``readinto`` of a 1 MiB buffer until the end).
Reported per run: MB/s, the CPU seconds (user + system) this process spent per GiB — the reader's
CPU alone, the origin runs elsewhere — and the TCP connections it opened (each one a TLS handshake),
counted with an audit hook on ``socket.connect``, so the same script measures a tree whose client
opens one connection per range. The load average is printed with the figures: this machine is shared.

    .venv/bin/python bench/httpsreader.py                    # 512 MiB, 3 runs
    .venv/bin/python bench/httpsreader.py --size 1GiB --range-size 8MiB --parallel 4
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
# Run as ``python bench/httpsreader.py``: bench/api.py would shadow the ``api`` package, and the
# repository root gives ``tests.httpfixtures``.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
sys.path.insert(0, str(REPO))

from appliance.sources.http import HttpClient  # noqa: E402
from appliance.sources.ranges import ReaderSettings  # noqa: E402
from appliance.sources.reader import open_reader  # noqa: E402
from appliance.sources.urlfilter import UrlPolicy  # noqa: E402
from tests.httpfixtures import NetworkRecorder, self_signed_cert  # noqa: E402

GIB = 1 << 30
_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": GIB}


def parse_size(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def one_run(url: str, port: int, cert: Path, settings: ReaderSettings, size: int) -> dict[str, float]:
    policy = UrlPolicy(
        allowed_endpoints=[f"https://imaging.test:{port}"], resolver=lambda host, port: ["127.0.0.1"]
    )
    http = HttpClient(policy, ca_certs=str(cert))
    buf = bytearray(1 << 20)
    got = 0
    with NetworkRecorder() as net:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        with open_reader({"url": url}, policy, settings=settings, http=http) as reader:
            while n := reader.readinto(buf):
                got += n
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if got != size:
        raise SystemExit(f"read {got} bytes of {size}")
    return {"seconds": wall, "cpu_per_gib": cpu * GIB / size, "connections": len(net.connected_hosts())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--range-size", default="8MiB")
    args = ap.parse_args()
    size = parse_size(args.size)
    settings = ReaderSettings(parallel=args.parallel, range_size=parse_size(args.range_size))
    with tempfile.TemporaryDirectory(prefix="httpsreader-") as tmp:
        directory = Path(tmp)
        cert, key = self_signed_cert(directory, ["imaging.test"])
        disk = directory / "disk.raw"
        with disk.open("wb") as f:
            for _ in range(0, size, 8 << 20):
                f.write(os.urandom(8 << 20))
            f.truncate(size)
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "rangeserver.py"), "--tls", str(cert), str(key), str(disk)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            url = f"https://imaging.test:{port}/disk.raw"
            runs = []
            for i in range(args.runs):
                r = one_run(url, port, cert, settings, size)
                runs.append(r)
                print(
                    f"run {i + 1}: {r['seconds']:.2f} s  {size / r['seconds'] / 1e6:.0f} MB/s  "
                    f"CPU {r['cpu_per_gib']:.2f} s/GiB  connections (TLS handshakes) {r['connections']:.0f}  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"median of {args.runs}: {size / med['seconds'] / 1e6:.0f} MB/s, CPU {med['cpu_per_gib']:.2f} s/GiB, "
        f"{med['connections']:.0f} connections for {-(-size // settings.range_size)} ranges "
        f"(size {args.size}, {args.parallel} in flight, ranges of {args.range_size})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
