#!/bin/bash
# The appliance image's costs: image size, cold and cached build time, and boot-to-API-ready time
# beside the boot time of the bare base image (debian-minimal, vm, cloud-init, SSH, DHCP) booted
# with the same accelerator and the same seed (user data), and their ratio; systemd-analyze's
# critical chain of the API unit (and of ssh.service in the base) is printed and kept.
#
#   bench/appliance.sh [--skip-cold]
#
# "Cold" means no cached output image: DIB's own caches (debootstrap tarball, .debs) are used as
# they are, as on a CI machine that keeps ~/.cache/image-create. Run as root. Results go to stdout
# and bench/out/appliance.json. Compare ratios, not absolute times: the machines are shared.
set -eu -o pipefail
if [ "${DIB_DEBUG_TRACE:-0}" -gt 0 ]; then
    set -x
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/bench/out
WORK=$ROOT/.build/bench
DATASOURCES="NoCloud, ConfigDrive"
skip_cold=0
[ "${1:-}" = --skip-cold ] && skip_cold=1
mkdir -p "$OUT" "$WORK"

seconds_of() { # seconds_of CMD...: run, print the wall-clock seconds
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >"$WORK/last-build.log" 2>&1 || { cat "$WORK/last-build.log" >&2; return 1; }
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.1f}')"
}

appliance=$WORK/imaging-appliance.qcow2
base=$WORK/base.qcow2
if [ "$skip_cold" = 1 ]; then
    cold=null
else
    cold=$(seconds_of "$ROOT/build.sh" -u -d "$DATASOURCES" -o "$appliance")
fi
cached=$(seconds_of "$ROOT/build.sh" -c -u -d "$DATASOURCES" -o "$appliance")
seconds_of "$ROOT/build.sh" -c -u -b -d "$DATASOURCES" -o "$base" >/dev/null
compressed=$WORK/imaging-appliance-compressed.qcow2
compressed_build=$(seconds_of "$ROOT/build.sh" -c -d "$DATASOURCES" -o "$compressed")

cd "$ROOT"
.venv/bin/python - "$appliance" "$base" "$compressed" "$cold" "$cached" "$compressed_build" "$OUT/appliance.json" <<'EOF'
"""Boot the base and the appliance images the same way and time them."""

import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.image import vm as vmlib
from tests.servers import TEST_ACCESS_KEY, TEST_SECRET_KEY

appliance, base, compressed = (Path(p) for p in sys.argv[1:4])
cold, cached, compressed_build = (None if a == "null" else float(a) for a in sys.argv[4:7])
out = Path(sys.argv[7])


def info(path: Path) -> dict:
    q = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                  capture_output=True, text=True).stdout)
    return {"file_mib": round(path.stat().st_size / 2**20), "virtual_gib": round(q["virtual-size"] / 2**30, 2)}


def boot(image: Path, work: Path, key: Path, imaging: dict, unit: str) -> dict:
    """Boot ``image`` with the seed every image gets here (the base ignores ``imaging:``); time SSH,
    the API's health (appliance) and cloud-init; print systemd's critical chain of ``unit``."""
    data = {
        "disable_root": False,
        "ssh_authorized_keys": [key.with_suffix(".pub").read_text().strip()],
        "imaging": imaging,
    }
    api_ready: dict[str, float] = {}

    def watch_api(vm: vmlib.Vm, started: float) -> None:
        # from qemu's start, beside the wait for SSH: the API may answer first
        def poll() -> None:
            while vm.alive() and "s" not in api_ready:
                with contextlib.suppress(Exception):
                    if vm.get_json("/v1/health", timeout=2)[0] == 200:
                        api_ready["s"] = time.monotonic() - started
                        return
                time.sleep(0.5)

        if unit == "imaging-api.service":
            threading.Thread(target=poll, daemon=True).start()

    # the machine is shared: when each boot ran and the load around it go into the results
    started_utc = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
    load_before = [round(x, 2) for x in os.getloadavg()]
    vm = vmlib.boot(image, work, data, key, on_start=watch_api)
    try:
        t = {"accel": vm.accel, "started_utc": started_utc, "loadavg_before": load_before,
             "ssh_s": round(vm.boot_seconds["ssh"], 1)}
        if unit == "imaging-api.service":
            vm.wait_for("API health", lambda: "s" in api_ready, 300)
            t["api_ready_s"] = round(api_ready["s"], 1)
        vm.ssh("cloud-init status --wait", timeout=300)
        t["cloud_init_done_s"] = round(time.monotonic() - vm.boot_seconds["started"], 1)
        for what, cmd in (
            ("systemd_analyze", "systemd-analyze"),
            ("critical_chain", f"systemd-analyze critical-chain {unit}"),
            ("blame", "systemd-analyze blame | head -n 15"),
        ):
            out = vm.ssh(cmd, timeout=120, check=False)
            t[what] = out.stdout.strip().splitlines()
            print(f"--- {image.name}: {cmd}\n{out.stdout.strip()}", file=sys.stderr)
        t["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        return t
    finally:
        vm.stop()


with tempfile.TemporaryDirectory(prefix="imaging-bench-") as tmp:
    tmp = Path(tmp)
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    imaging = {
        "appliance_id": "bench-1",
        "api": {"bind": "0.0.0.0:8773",
                "credentials": [{"access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY}]},
    }
    base_t = boot(base, tmp / "base", key, imaging, "ssh.service")
    app_t = boot(appliance, tmp / "appliance", key, imaging, "imaging-api.service")

result = {
    "image": {"compressed": info(compressed), "uncompressed": info(appliance), "base_uncompressed": info(base)},
    "build_s": {"cold_uncompressed": cold, "cached": cached, "compressed_or_cached": compressed_build},
    "boot": {"base": base_t, "appliance": app_t,
             "ratio_api_ready_to_base_ssh": round(app_t["api_ready_s"] / base_t["ssh_s"], 2),
             "ratio_cloud_init_done": round(app_t["cloud_init_done_s"] / base_t["cloud_init_done_s"], 2)},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
