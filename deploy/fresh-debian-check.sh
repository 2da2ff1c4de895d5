#!/usr/bin/env bash
# Prove the README's two commands on a clean Debian 12 (bookworm) root.
#
#   sudo deploy/fresh-debian-check.sh [ROOTFS] [BRANCH]
#
# 1. debootstrap a minimal bookworm root (variant minbase) with only python3,
#    python3-venv, make, git and ca-certificates added, from the same Debian
#    mirror this machine uses (MIRROR, default: the first deb.debian.org-style
#    URI in /etc/apt/sources.list*), with the same suites (bookworm,
#    bookworm-updates, bookworm-security);
# 2. copy in what reaching PyPI needs: /etc/resolv.conf, /etc/pip.conf and the
#    local certificate authorities (/usr/local/share/ca-certificates);
# 3. git-clone BRANCH (default: the current branch) of this repository into it;
# 4. inside `chroot`, as a newcomer would: `make run` (wait until the web app
#    and the mail daemon answer, then Ctrl-C it, i.e. SIGINT to its process
#    group) and then `make test`.
#
# It takes long (debootstrap, apt, pip, the whole suite on a clean machine),
# so `make test` does not run it. Logs: ROOTFS/root/{make-run,make-test}.log;
# the last lines are printed. An existing ROOTFS is reused for step 1 (delete
# it for a truly clean run); the clone is always fresh. Needs root and
# debootstrap (apt-get install debootstrap).
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
ROOTFS="${1:-/var/tmp/tempmail-fresh-debian}"
BRANCH="${2:-$(git -C "$HERE" rev-parse --abbrev-ref HEAD)}"
SUITE=bookworm
EXTRA_DEBS=python3,python3-venv,make,git,ca-certificates

host_mirror() {
    # The Debian archive this machine's apt uses (deb822 "URIs:" or one-line "deb" form).
    grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true
}
MIRROR="${MIRROR:-$(host_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-${MIRROR%/debian*}/debian-security}"

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mount)"; exit 1; }
command -v debootstrap >/dev/null || { echo "apt-get install debootstrap"; exit 1; }

make_root() {
    if [ -f "$ROOTFS/.tempmail-bootstrapped" ]; then
        echo "== reusing $ROOTFS"
        return
    fi
    echo "== debootstrap $SUITE ($MIRROR) into $ROOTFS"
    debootstrap --variant=minbase --include="$EXTRA_DEBS" "$SUITE" "$ROOTFS" "$MIRROR"
    cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    touch "$ROOTFS/.tempmail-bootstrapped"
}

MOUNTED=()
mount_all() {
    # The root a mount point of its own, as on a real machine: `ip netns`
    # (the cluster tests) makes / a slave mount first, which fails on a
    # plain directory ("mount --make-rslave /" failed: Invalid argument).
    mount --bind "$ROOTFS" "$ROOTFS"; MOUNTED+=("$ROOTFS")
    mount -t proc proc "$ROOTFS/proc"; MOUNTED+=("$ROOTFS/proc")
    for fs in sys dev; do
        # rslave: unmounting the copy later must not unmount the host's /dev/pts, /dev/shm ...
        mount --rbind "/$fs" "$ROOTFS/$fs"
        mount --make-rslave "$ROOTFS/$fs"
        MOUNTED+=("$ROOTFS/$fs")
    done
}
umount_all() {
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTED[$i]}" 2>/dev/null || umount -lR "${MOUNTED[$i]}" || true
    done
}

in_root() {
    # A clean environment, as a login on the new machine would have.
    chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

make_root
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOTFS/etc/pip.conf"
# Certificate authorities this machine adds to Debian's (a TLS-inspecting
# egress proxy's, say): without them pip cannot verify PyPI from inside.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
rm -rf "$ROOTFS/root/tempmail"
git clone --quiet --branch "$BRANCH" "$HERE" "$ROOTFS/root/tempmail"
echo "== cloned $BRANCH at $(git -C "$ROOTFS/root/tempmail" log -1 --format='%h %s')"
echo "== inside: $(in_root python3 --version), $(in_root make --version | head -n1)"

trap umount_all EXIT
mount_all

echo "== make run (stopped with SIGINT to its process group once it answers)"
# Python, not a background job of a script shell: such a job starts with
# SIGINT ignored, and make would then ignore the Ctrl-C being tested.
in_root python3 - >"$ROOTFS/root/make-run.log" 2>&1 <<'EOF' && run_status=0 || run_status=$?
import os, signal, socket, subprocess, sys, time, urllib.request

def answers() -> bool:
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/healthz", timeout=2).read()
        with socket.create_connection(("127.0.0.1", 2525), timeout=2) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False

def group_members(pgid: int) -> list:
    """Processes (not zombies) still in the process group, from /proc (no ps in minbase)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            left.append(pid)
    return left

with open("/root/make-run.out", "wb") as out:
    make = subprocess.Popen(["make", "run"], cwd="/root/tempmail", stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 1800  # a clean machine pip-installs everything first
    answered = False
    while time.monotonic() < deadline and make.poll() is None:
        if answers():
            answered = True
            break
        time.sleep(1)
    try:
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    except ProcessLookupError:
        pass  # make ended by itself (an error before it answered): its output says why
    status = make.wait(timeout=120)
time.sleep(1)
output = open("/root/make-run.out", errors="replace").read()
print(output)
shell_status = 128 - status if status < 0 else status  # how a shell shows death by a signal
left = group_members(make.pid)
print(f"answered: {answered}; make run exit status after SIGINT: {shell_status}; "
      f"processes of its group left: {left or 'none'}")
crashed = "Segmentation fault" in output or "RecursionError" in output
sys.exit(0 if answered and not crashed and not left and shell_status in (0, 130) else 1)
EOF
tail -n 8 "$ROOTFS/root/make-run.log"

echo "== make test (the whole suite; slow on a shared CPU)"
in_root /bin/bash -c 'cd /root/tempmail && make test' >"$ROOTFS/root/make-test.log" 2>&1 \
    && test_status=0 || test_status=$?
tail -n 40 "$ROOTFS/root/make-test.log"
echo "== make run: $( [ "$run_status" = 0 ] && echo ok || echo FAILED ); make test exit status: $test_status"
[ "$run_status" = 0 ] && [ "$test_status" = 0 ]
