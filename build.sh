#!/bin/bash
# Build the Imaging Appliance image with diskimage-builder.
#
#   ./build.sh [-o OUTPUT] [-f qcow2|raw] [-s SIZE_GB] [-k PUBKEY_FILE] [-r RENDEZVOUS_FILE] [-d DATASOURCES] [-u] [-c] [-x]
#
# See usage() below and README.md. Runs as root or through sudo (DIB needs loop devices and chroot).
set -eu -o pipefail
if [ "${DIB_DEBUG_TRACE:-0}" -gt 0 ]; then
    set -x
fi

DIB_VERSION=3.43.0
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${IMAGING_BUILD_DIR:-$ROOT/.build}
DIB_VENV=$WORK/dib-venv
CACHE_DIR=$WORK/cache

output=$ROOT/imaging-appliance.qcow2
format=qcow2
size=""
ssh_key_file=""
rendezvous_file=""
datasources=${DIB_CLOUD_INIT_DATASOURCES:-"NoCloud, ConfigDrive, Ec2"}
compress=1
use_cache=0
base_only=0
trace=${DIB_DEBUG_TRACE:-0}

usage() {
    cat <<EOF
usage: $0 [options]

Builds the Imaging Appliance disk image (Debian 12, cloud-init, the imaging services).

  -o PATH        output image (default: imaging-appliance.qcow2 in the checkout)
  -f FORMAT      qcow2 (default) or raw
  -s SIZE        image size in GB (default: what the content needs; cloud-init grows the root
                 partition to the disk at boot)
  -k FILE        debug image: install this SSH public key for root (never ship such an image)
  -r FILE        bake the rendezvous line in FILE (imaging:v1::<controller-url>:<enrolment-secret>)
                 into /etc/imaging/rendezvous: an instance launched without user data asks that
                 controller for its identity and configuration (dynamic assignment)
  -d LIST        cloud-init datasources (default: "NoCloud, ConfigDrive, Ec2")
  -u             do not compress the qcow2 (faster build, larger file)
  -c             reuse the image cached under .build/cache when the inputs (elements/, build.sh,
                 the project's sources, pyproject.toml, the options) are unchanged
  -b             the bare base only (debian-minimal, vm, cloud-init, SSH, DHCP: no imaging
                 elements), for boot-time comparisons (bench/appliance.sh)
  -x             diskimage-builder trace (DIB_DEBUG_TRACE=1)
  -h             this help
EOF
}

die() {
    echo "build.sh: $*" >&2
    exit 1
}

while getopts ":o:f:s:k:r:d:ucbxh" opt; do
    case $opt in
        o) output=$OPTARG ;;
        f) format=$OPTARG ;;
        s) size=$OPTARG ;;
        k) ssh_key_file=$OPTARG ;;
        r) rendezvous_file=$OPTARG ;;
        d) datasources=$OPTARG ;;
        u) compress=0 ;;
        c) use_cache=1 ;;
        b) base_only=1 ;;
        x) trace=1 ;;
        h) usage; exit 0 ;;
        :) usage >&2; die "option -$OPTARG needs a value" ;;
        *) usage >&2; die "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || die "unexpected argument: $1"

case $format in
    qcow2 | raw) ;;
    *) die "unsupported format '$format': use qcow2 or raw" ;;
esac
if [ -n "$size" ] && ! [[ $size =~ ^[1-9][0-9]*$ ]]; then
    die "size must be a whole number of GB, got '$size'"
fi
if [ -n "$ssh_key_file" ]; then
    [ -r "$ssh_key_file" ] || die "cannot read SSH public key file $ssh_key_file"
    grep -qE '^(ssh-|ecdsa-)[a-z0-9-]+ [A-Za-z0-9+/=]+' "$ssh_key_file" ||
        die "$ssh_key_file is not an SSH public key"
fi
if [ -n "$rendezvous_file" ]; then
    [ -r "$rendezvous_file" ] || die "cannot read the rendezvous file $rendezvous_file"
    # one line, the enrolment form: an id baked into an image would be every instance's identity
    [ "$(grep -c . "$rendezvous_file")" = 1 ] &&
        grep -qE '^imaging:v1::https?://[^[:space:]]+:[^:[:space:]]{16,}$' "$rendezvous_file" ||
        die "$rendezvous_file must hold the one line imaging:v1::<controller-url>:<enrolment-secret> (no appliance id; a secret of 16+ characters without ':')"
    rendezvous_file=$(cd "$(dirname "$rendezvous_file")" && pwd)/$(basename "$rendezvous_file")
fi
case $output in
    /*) ;;
    *) output=$PWD/$output ;;
esac
# DIB appends the format's extension to the name it is given.
output=${output%."$format"}.$format
out_base=${output%."$format"}

# --- host prerequisites: one exact message per missing command --------------------------------
check_prerequisites() {
    local missing=0 entry cmd pkg
    for entry in qemu-img:qemu-utils debootstrap:debootstrap kpartx:kpartx sfdisk:fdisk \
        mkfs.ext4:e2fsprogs mkfs.vfat:dosfstools losetup:mount partx:util-linux sudo:sudo \
        chroot:coreutils flock:util-linux git:git file:file python3:python3 sgdisk:gdisk; do
        cmd=${entry%%:*}
        pkg=${entry#*:}
        if ! PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1; then
            echo "build.sh: missing prerequisite: $cmd (Debian package $pkg)" >&2
            missing=1
        fi
    done
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        echo "build.sh: missing prerequisite: python3 venv module (Debian package python3-venv)" >&2
        missing=1
    fi
    if [ ! -e /dev/loop-control ]; then
        echo "build.sh: missing prerequisite: /dev/loop-control (loop devices; a container needs them passed in)" >&2
        missing=1
    fi
    if [ "$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then
        echo "build.sh: missing prerequisite: root or password-less sudo (DIB mounts loop devices and chroots)" >&2
        missing=1
    fi
    [ "$missing" = 0 ] || die "install the missing prerequisites (see README.md) and run again"
}

# --- inputs hash: what the image is made of ----------------------------------------------------
inputs_hash() {
    (
        cd "$ROOT"
        find elements appliance api build.sh pyproject.toml -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z |
            xargs -0 stat -c '%n %a' | sha256sum
        find elements appliance api build.sh pyproject.toml -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
        echo "format=$format size=$size compress=$compress base=$base_only datasources=$datasources dib=$DIB_VERSION"
        if [ -n "$ssh_key_file" ]; then cat "$ssh_key_file"; fi
        if [ -n "$rendezvous_file" ]; then echo rendezvous; cat "$rendezvous_file"; fi
    ) | sha256sum | cut -c1-16
}

print_result() {
    local seconds=$1 how=$2
    python3 - "$output" "$seconds" "$how" <<'EOF'
import json, os, subprocess, sys
path, seconds, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path], check=True,
                                 capture_output=True, text=True).stdout)
print(f"build.sh: {how} {path}: {info['format']}, file {os.path.getsize(path) / 2**20:.0f} MiB, "
      f"virtual {info['virtual-size'] / 2**30:.2f} GiB, build time {seconds} s")
EOF
}

start=$SECONDS
check_prerequisites
# One build at a time per work directory (shared wheelhouse, logs, DIB caches); a second build
# waits and then usually finds its result cached.
mkdir -p "$WORK" "$CACHE_DIR"
exec 9>"$WORK/build.lock"
flock 9
hash=$(inputs_hash)
cached=$CACHE_DIR/$hash.$format
if [ "$use_cache" = 1 ] && [ -f "$cached" ]; then
    if [ "$cached" != "$output" ]; then
        ln -f "$cached" "$output" 2>/dev/null || cp --sparse=always "$cached" "$output"
    fi
    echo "build.sh: inputs unchanged (hash $hash): reusing $cached"
    print_result $((SECONDS - start)) "cached"
    exit 0
fi

# --- diskimage-builder, pinned, in its own venv --------------------------------------------------
mkdir -p "$WORK" "$CACHE_DIR"
if ! "$DIB_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('diskimage-builder') != '$DIB_VERSION')" 2>/dev/null; then
    echo "build.sh: installing diskimage-builder==$DIB_VERSION into $DIB_VENV"
    python3 -m venv "$DIB_VENV"
    "$DIB_VENV/bin/pip" install -q "diskimage-builder==$DIB_VERSION"
fi
export PATH=$DIB_VENV/bin:$PATH

# --- the elements must pass DIB's own lint -------------------------------------------------------
lint_lib=$(mktemp -d)
trap 'rm -rf "$lint_lib"' EXIT
(cd "$ROOT" && ELEMENTS_DIR=elements LIB_DIR=$lint_lib dib-lint) >"$WORK/dib-lint.log" 2>&1 ||
    { cat "$WORK/dib-lint.log" >&2; die "dib-lint found problems in elements/"; }

# --- kernels without device-mapper (containers): partitions through partx ------------------------
# DIB 3.43.0 maps partitions with `sudo kpartx -a|-av|-uvs|-d DEV`, `sudo dmsetup --noudevsync
# mknodes` and `sudo dmsetup remove NAME`; it only needs /dev/mapper/loopNpM to be the partitions.
# A `sudo` wrapper first on PATH sends those two commands to replacements (sudo's secure_path would
# otherwise pick the real ones); everything else goes to the real sudo.
if ! grep -qw device-mapper /proc/misc; then
    shim=$WORK/dm-shim
    mkdir -p "$shim"
    real_sudo=$(PATH=/usr/bin:/bin:/usr/sbin:/sbin command -v sudo)
    cat >"$shim/sudo" <<EOF
#!/bin/bash
# Generated by build.sh: device-mapper is missing on this kernel.
args=("\$@")
i=0
while [ \$i -lt \${#args[@]} ] && [[ \${args[\$i]} == -* ]]; do i=\$((i + 1)); done
case "\${args[\$i]:-}" in
    kpartx | dmsetup) exec "$shim/\${args[\$i]}-partx" "\${args[@]:\$((i + 1))}" ;;
esac
exec $real_sudo "\$@"
EOF
    cat >"$shim/kpartx-partx" <<'EOF'
#!/bin/bash
# kpartx replacement: partitions of a loop device as /dev/loopNpM (partx), linked from /dev/mapper.
set -eu -o pipefail
mode=""
for arg in "$@"; do
    case $arg in
        -*a* | -*u*) mode=add ;;
        -*d*) mode=delete ;;
        /dev/*) dev=$arg ;;
    esac
done
name=$(basename "$dev")
mkdir -p /dev/mapper
if [ "$mode" = add ]; then
    partx -d "$dev" 2>/dev/null || true
    partx -a -v "$dev"
    for part in /dev/"$name"p*; do
        [ -b "$part" ] || continue
        ln -sf "$part" "/dev/mapper/$(basename "$part")"
        echo "add map $(basename "$part")"
    done
elif [ "$mode" = delete ]; then
    rm -f /dev/mapper/"$name"p*
    partx -d "$dev" || true
fi
EOF
    cat >"$shim/dmsetup-partx" <<'EOF'
#!/bin/bash
# dmsetup replacement: mknodes has nothing to do; remove drops the /dev/mapper link.
set -eu -o pipefail
args=()
for arg in "$@"; do
    case $arg in --*) ;; *) args+=("$arg") ;; esac
done
case "${args[0]:-}" in
    mknodes) ;;
    remove) rm -f "/dev/mapper/${args[1]}" ;;
    *) echo "dmsetup-partx: unsupported: $*" >&2; exit 1 ;;
esac
EOF
    chmod 0755 "$shim"/*
    export PATH=$shim:$PATH
    echo "build.sh: no device-mapper in this kernel: partitions through partx ($shim)"
fi

# --- the project: a wheelhouse built from this checkout ------------------------------------------
wheelhouse=$WORK/wheelhouse
rm -rf "$wheelhouse"
mkdir -p "$wheelhouse"
echo "build.sh: building the wheelhouse (the project and its dependencies)"
"$DIB_VENV/bin/pip" wheel -q --wheel-dir "$wheelhouse" "$ROOT" >"$WORK/wheel.log" 2>&1 ||
    { cat "$WORK/wheel.log" >&2; die "building the project's wheels failed"; }
version=$("$DIB_VENV/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])
EOF
)
git_ref=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
git_describe=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
dirty=false
if [ -n "$(git -C "$ROOT" status --porcelain -- elements appliance api build.sh pyproject.toml 2>/dev/null)" ]; then
    dirty=true
fi
build_info=$WORK/build-info.json
cat >"$build_info" <<EOF
{"name": "imaging-appliance", "version": "$version", "git_ref": "$git_ref",
 "git_describe": "$git_describe", "dirty": $dirty, "inputs_sha256": "$hash",
 "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "diskimage_builder": "$DIB_VERSION",
 "cloud_init_datasources": "$datasources"}
EOF

# --- the Debian mirror this host uses (never a host name written in the repository) -------------
# Prints "MAIN_URI SECURITY_URI" from deb822 .sources files or one-line sources.list entries.
apt_mirrors() {
    python3 - <<'EOF'
import glob, re
main = security = None
def take(uri, suites):
    global main, security
    if any(s.endswith("-security") or "/updates" in s for s in suites):
        security = security or uri
    else:
        main = main or uri
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for para in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", para, re.M))
        if fields.get("Enabled", "yes").lower() == "no" or "deb" not in fields.get("Types", "").split():
            continue
        for uri in fields.get("URIs", "").split():
            take(uri.rstrip("/"), fields.get("Suites", "").split())
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            take(m.group(1).rstrip("/"), [m.group(2)])
print(main or "", security or "")
EOF
}
read -r mirror security_mirror < <(apt_mirrors)
if [ -n "$mirror" ]; then
    export DIB_DISTRIBUTION_MIRROR=${DIB_DISTRIBUTION_MIRROR:-$mirror}
fi
if [ -n "$security_mirror" ]; then
    export DIB_DEBIAN_SECURITY_MIRROR=${DIB_DEBIAN_SECURITY_MIRROR:-$security_mirror}
fi
echo "build.sh: Debian mirror ${DIB_DISTRIBUTION_MIRROR:-DIB default}, security ${DIB_DEBIAN_SECURITY_MIRROR:-DIB default}"

# --- diskimage-builder -------------------------------------------------------------------------
export ELEMENTS_PATH=$ROOT/elements
export DIB_RELEASE=bookworm
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
export DIB_GRUB_TIMEOUT=${DIB_GRUB_TIMEOUT:-0}
export DIB_CLOUD_INIT_DATASOURCES=$datasources
# Reuse DIB's caches (debootstrap tarball, .debs) between builds.
export DIB_DEBOOTSTRAP_CACHE=1
export DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=1
export DIB_IMAGING_WHEELHOUSE=$wheelhouse
export DIB_IMAGING_BUILD_INFO=$build_info
export DIB_IMAGING_RENDEZVOUS_FILE=$rendezvous_file
export DIB_DEBUG_TRACE=$trace

elements=(debian-minimal vm imaging-base imaging-appliance imaging-services imaging-scratch)
if [ "$base_only" = 1 ]; then
    elements=(debian-minimal vm imaging-base)
fi
if [ -n "$ssh_key_file" ]; then
    elements+=(imaging-debug-ssh)
    DIB_IMAGING_DEBUG_SSH_KEY=$(head -n1 "$ssh_key_file")
    export DIB_IMAGING_DEBUG_SSH_KEY
fi
dib_args=(-t "$format" -o "$out_base")
if [ "$compress" = 0 ]; then dib_args+=(-u); fi
if [ -n "$size" ]; then dib_args+=(--image-size "$size"); fi
if [ "$trace" -gt 0 ]; then dib_args+=(-x); fi

mkdir -p "$(dirname "$output")"
rm -f "$output"
# DIB's caches (~/.cache/image-create: the base tarball, the apt archives bind-mounted into the
# chroot) are shared by every checkout on this machine, and apt in a second build's chroot fails at
# once on the archives lock the first holds. So builds of all checkouts take turns here.
dib_cache=${DIB_IMAGE_CACHE:-$HOME/.cache/image-create}
mkdir -p "$dib_cache"
exec 8>"$dib_cache/.imaging-build.lock"
if ! flock -n 8; then
    echo "build.sh: another image build on this machine holds $dib_cache; waiting for it"
    flock 8
fi
echo "build.sh: disk-image-create ${dib_args[*]} ${elements[*]} (log: $WORK/dib.log)"
if ! disk-image-create "${dib_args[@]}" "${elements[@]}" >"$WORK/dib.log" 2>&1; then
    tail -n 40 "$WORK/dib.log" >&2
    die "disk-image-create failed; full log in $WORK/dib.log"
fi
exec 8>&-
[ -f "$output" ] || die "disk-image-create finished but $output is missing"
rm -rf "$out_base.d"

# Keep the newest few cached builds only: each is about 1 GiB.
ln -f "$output" "$cached" 2>/dev/null || cp --sparse=always "$output" "$cached"
find "$CACHE_DIR" -maxdepth 1 -type f -name "*.$format" -printf '%T@ %p\n' | sort -rn | tail -n +7 |
    cut -d' ' -f2- | xargs -r rm -f
print_result $((SECONDS - start)) "built"
