#!/usr/bin/env bash
# Installs mshv-libvirt on a Debian 12 machine and starts the system daemon virtmshvd.
#
#   scripts/install.sh     (as root)
#
# Afterwards `virsh -c mshv:///system list --all` works with no client configuration. Where
# /dev/mshv does not exist the daemon runs VMs on the built-in emulated device (KVM-backed when
# /dev/kvm exists).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=${MSHV_LIBVIRT_PREFIX:-/opt/mshv-libvirt}

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs packages and a system service)" >&2
    exit 1
fi

bash "$src/scripts/install-deps.sh"
# libvirt's libvirtd, for storage and networks (relayed to its drivers).
bash "$src/scripts/start-libvirtd.sh"

# A venv built from Debian's /usr/bin/python3 (not a per-user pyenv) so that libvirt can
# autostart the daemon as any user.
/usr/bin/python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --upgrade pip
"$prefix/bin/pip" install -q "$src"
ln -sf "$prefix/bin/virtmshvd" /usr/sbin/virtmshvd
install -d -m 0755 /etc/libvirt/mshv /run/libvirt
# VMMs run as this unprivileged user (docs/SECURITY.md); it reads the installed package and nothing
# else: the daemon hands it every descriptor it uses.
getent group libvirt-mshv >/dev/null || groupadd --system libvirt-mshv
getent passwd libvirt-mshv >/dev/null ||
    useradd --system --gid libvirt-mshv --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "mshv-libvirt VMM" libvirt-mshv
chmod -R a+rX "$prefix"
data="$("$prefix/bin/python" -c 'import importlib.resources as r; print(r.files("mshv_libvirt") / "data")')"
[ -f /etc/libvirt/mshv.conf ] || install -m 0644 "$data/mshv.conf" /etc/libvirt/mshv.conf

units="$("$prefix/bin/python" -c 'import importlib.resources as r; print(r.files("mshv_libvirt") / "data" / "systemd")')"
install -m 0644 "$units"/virtmshvd*.socket "$units"/virtmshvd.service /etc/systemd/system/
if [ -d "$units/user" ]; then
    install -d /etc/systemd/user
    install -m 0644 "$units"/user/* /etc/systemd/user/
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    # The service is enabled too so autostart domains start at boot (it then idles out; the sockets
    # bring it back on the next connection), as libvirt does for its modular daemons.
    systemctl enable --now virtmshvd.socket virtmshvd-ro.socket
    systemctl enable virtmshvd.service
    systemctl restart virtmshvd.service || true
else
    # No systemd as PID 1 (containers, sandboxes): run the daemon directly.
    # The new daemon can only start once the old one has released its pid file lock (SIGTERM ends a
    # daemon within a few seconds, running VMs stay up and are re-attached). --daemon returns once
    # the daemon serves, non-zero if it cannot.
    old=$(cat /run/libvirt/mshv/virtmshvd.pid 2>/dev/null || cat /run/virtmshvd.pid 2>/dev/null || true)
    if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then
        kill "$old" || true
        for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    fi
    /usr/sbin/virtmshvd --system --daemon --pidfile /run/virtmshvd.pid
fi

for _ in $(seq 50); do
    [ -S /run/libvirt/virtmshvd-sock ] && break
    sleep 0.1
done
virsh -c mshv:///system version
echo "virtmshvd is running: virsh -c mshv:///system list --all"
