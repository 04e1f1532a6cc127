#!/usr/bin/env bash
# Starts libvirt's own libvirtd, whose storage and network drivers virtmshvd relays storage pool,
# volume and network calls to (docs/DAEMON.md, "Storage and networks come from libvirt"). Idempotent;
# run as root, after scripts/install-deps.sh (which installs libvirt-daemon, qemu-utils, dnsmasq-base
# and iptables, but not libvirt-daemon-system: its "default" NAT network would rewrite the host's
# firewall). Defines and starts no network.
set -euo pipefail

# libvirtd's QEMU driver refuses to start ("Failed to parse user 'libvirt-qemu'") without the user and
# groups libvirt-daemon-system's postinst would have made; the same ones, made the same way.
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu

answers() { timeout 10 virsh -c storage:///system uri >/dev/null 2>&1; }

if answers; then
    echo "libvirtd is running"
    exit 0
fi

install -d -m 0755 /var/log/libvirt
if [ -d /run/systemd/system ]; then
    if [ -f /lib/systemd/system/libvirtd.service ] || [ -f /usr/lib/systemd/system/libvirtd.service ]; then
        systemctl enable --now libvirtd.service # libvirt-daemon-system is installed after all: its unit
    else
        # libvirt-daemon ships no unit: a plain one (libvirtd notifies systemd when it serves).
        cat >/etc/systemd/system/mshv-libvirtd.service <<'EOF'
[Unit]
Description=libvirt's libvirtd (storage and network drivers for mshv-libvirt)
Documentation=man:libvirtd(8)
After=network.target
Before=virtmshvd.service

[Service]
Type=notify
ExecStart=/usr/sbin/libvirtd
# Its dnsmasq processes outlive a restart of libvirtd, as with libvirt-daemon-system's unit.
KillMode=process
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
        systemctl daemon-reload
        systemctl enable --now mshv-libvirtd.service
    fi
else
    # No systemd as PID 1 (containers, sandboxes): libvirtd daemonizes itself (pid in /run/libvirtd.pid).
    LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" /usr/sbin/libvirtd -d
fi

for _ in $(seq 300); do
    answers && {
        echo "libvirtd is running"
        exit 0
    }
    sleep 0.1
done
echo "start-libvirtd.sh: libvirtd does not answer on /run/libvirt/libvirt-sock (see /var/log/libvirt/libvirtd.log)" >&2
exit 1
