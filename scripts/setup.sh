#!/usr/bin/env bash
# Stagely machine setup (Debian 12, run as root). Idempotent: installs only what
# is missing, so a second run on a ready machine does nothing and takes < 2 s.
#
# Provides: git, buildah with runc (RUN steps in their own containers), skopeo, docker-registry (Distribution), qemu-user-static
# + arm64 binfmt registration, static busybox for amd64 and arm64 at
# /usr/local/lib/stagely/busybox-{amd64,arm64}, cloud-init (schema checks),
# Packer (golden-image template validation), systemd-analyze (unit checks),
# PostgreSQL running on 127.0.0.1:5432, moto's EC2 API server (venv in
# /usr/local/lib/stagely/moto-venv).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
LIBDIR=/usr/local/lib/stagely
BINFMT=/proc/sys/fs/binfmt_misc
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup.sh: must run as root (or with sudo available)" >&2; exit 1
    fi
fi

log() { echo "setup.sh: $*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# --- 1. packages -------------------------------------------------------------
# "command:package" pairs; a package is wanted only if its command is absent.
wanted=()
for pair in \
    git:git curl:curl file:file buildah:buildah runc:runc skopeo:skopeo \
    docker-registry:docker-registry qemu-aarch64-static:qemu-user-static \
    cloud-init:cloud-init newuidmap:uidmap cc:gcc pkg-config:pkg-config \
    packer:packer systemd-analyze:systemd ip:iproute2 \
    unshare:util-linux mkfs.ext4:e2fsprogs losetup:mount; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    have "$cmd" || wanted+=("$pkg")
done
pkg_installed busybox-static || wanted+=(busybox-static)
if ! have pg_ctlcluster || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    wanted+=(postgresql)
fi

installed_any=no
if [ ${#wanted[@]} -gt 0 ]; then
    log "installing: ${wanted[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
    installed_any=yes
fi

# --- 1b. moto (an EC2 API peer for the ec2 provider's tests), in its own venv ------
MOTO_VENV=$LIBDIR/moto-venv
if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
    log "installing moto[server] into $MOTO_VENV"
    $SUDO mkdir -p "$LIBDIR"
    have python3 || { $SUDO apt-get update -qq; $SUDO apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null; }
    $SUDO python3 -m venv "$MOTO_VENV"
    $SUDO "$MOTO_VENV/bin/pip" install -q 'moto[server]>=5.1,<6'
fi

# --- 2. arm64 emulation (binfmt_misc + qemu-aarch64) ---------------------------
# Not fatal: without it only arm64 RUN steps fail; everything else still works.
binfmt_ok=yes
if [ ! -e "$BINFMT/register" ]; then
    $SUDO mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null || binfmt_ok=no
fi
if [ "$binfmt_ok" = yes ] && [ ! -e "$BINFMT/qemu-aarch64" ]; then
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    # Flags include F (fix binary): the interpreter is opened now, so it also
    # works inside buildah's chroot.
    grep -v '^[[:space:]]*#' "$conf" | grep -m1 . | $SUDO tee "$BINFMT/register" >/dev/null || binfmt_ok=no
fi
if [ "$binfmt_ok" = yes ] && ! grep -q '^enabled' "$BINFMT/qemu-aarch64"; then
    echo 1 | $SUDO tee "$BINFMT/qemu-aarch64" >/dev/null || binfmt_ok=no
fi
[ "$binfmt_ok" = yes ] || log "WARNING: could not register qemu-aarch64 in $BINFMT (needs a privileged host); arm64 RUN steps will fail"

# --- 3. static busybox per architecture ---------------------------------------
$SUDO mkdir -p "$LIBDIR"
if [ ! -x "$LIBDIR/busybox-amd64" ]; then
    $SUDO install -m 0755 /bin/busybox "$LIBDIR/busybox-amd64"
fi
if [ ! -x "$LIBDIR/busybox-arm64" ]; then
    log "fetching busybox-static:arm64"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    added_arch=no
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        $SUDO dpkg --add-architecture arm64
        added_arch=yes
    fi
    $SUDO apt-get update -qq
    # apt-get download runs as the invoking user; _apt needs to write there.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get download -qq busybox-static:arm64 >/dev/null)
    dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$tmp/x"
    $SUDO install -m 0755 "$tmp/x/bin/busybox" "$LIBDIR/busybox-arm64"
    if [ "$added_arch" = yes ]; then
        # Keep the machine amd64-only for apt; the .deb is all we needed.
        $SUDO dpkg --remove-architecture arm64 || true
        $SUDO apt-get update -qq || true
    fi
    rm -rf "$tmp"; trap - EXIT
fi
arch_amd64=$("$LIBDIR/busybox-amd64" uname -m)
arch_arm64=$("$LIBDIR/busybox-arm64" uname -m 2>/dev/null || echo "not-runnable")
if [ "$arch_arm64" != aarch64 ]; then
    log "WARNING: $LIBDIR/busybox-arm64 does not run under qemu (got: $arch_arm64)"
fi

# --- 4. PostgreSQL on 127.0.0.1:5432 ------------------------------------------
# Tests connect as user postgres over TCP without a password and create/drop
# their own throwaway databases, so 127.0.0.1 must be "trust" (Debian's default
# is scram-sha-256).
pg_state=up
ver=$(ls /etc/postgresql | sort -V | tail -n1)
hba=/etc/postgresql/$ver/main/pg_hba.conf
hba_changed=no
if [ -f "$hba" ] && ! $SUDO grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    log "pg_hba: trusting 127.0.0.1 (local test databases)"
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    hba_changed=yes
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL did not start"; exit 1; }
    pg_state=started
elif [ "$hba_changed" = yes ]; then
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
fi

# --- 5. summary ----------------------------------------------------------------
echo "setup.sh: ok (installed: $([ "$installed_any" = yes ] && echo "${wanted[*]}" || echo nothing)); buildah $(buildah --version | awk '{print $3}'), binfmt aarch64 $arch_arm64, busybox amd64=$arch_amd64, postgres $pg_state on 127.0.0.1:5432, moto $("$MOTO_VENV/bin/python" -c "import moto; print(moto.__version__)")"
