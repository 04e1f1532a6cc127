#!/usr/bin/env bash
# Debian 12 packages mshv-libvirt needs to build, run and test. Idempotent; run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
    # build: the compiled cffi core and libvirt-python (built against libvirt-dev via pkg-config)
    gcc binutils make pkg-config python3 python3-dev python3-venv libffi-dev libvirt-dev
    # clients the tests drive for real; libvirt0 ships the schemas (domain.rng) define also checks
    libvirt-clients libvirt0 python3-libvirt virtinst
    # libvirt's own libvirtd: storage pools/volumes and networks are relayed to its drivers
    # (scripts/start-libvirtd.sh starts it). Not libvirt-daemon-system: its "default" NAT network
    # would rewrite the host's firewall. qemu-img for qcow2 volumes; dnsmasq and iptables for the
    # network driver; ip (netns) and ss for the tests; ping for the guest kernel's network proof.
    libvirt-daemon qemu-utils dnsmasq-base iptables iproute2 iputils-ping
    # virtio-blk's data path: qemu-storage-daemon's vhost-user-blk export
    qemu-system-common
    # host SMBIOS for virsh sysinfo, read through dmidecode as libvirt does
    dmidecode
    # test guests: the tiny guest (binutils), busybox initramfs, Debian kernel (apt-get download + dpkg-deb),
    # peers for benchmarks, disk images
    apt busybox-static cpio xz-utils zstd kmod qemu-system-x86 qemu-utils util-linux
    # benchmarks/blk.py's reference: fio on the disk's raw image (qemu-img bench for qcow2)
    fio
    # system calls per VM exit, counted from outside (tests/emu/test_exit_syscalls.py)
    strace
    # virt-manager under a virtual screen (the tests set GSETTINGS_BACKEND=memory)
    virt-manager xvfb
    # --- virt-manager driven through its UI (tests/support/uitest.py): dogtail over AT-SPI, private D-Bus session
    python3-dogtail python3-pyatspi at-spi2-core dbus-daemon
    # ---
    # systemd-analyze verifies the shipped units
    systemd
    # test runner
    tox
    # the small test guest kernel (scripts/build-test-kernel.sh): its source tarball and build tools
    linux-source-6.1 flex bison libelf-dev bc libssl-dev make gcc xz-utils
    # iasl -d: the DSDT test reads the generated AML back with ACPICA's own disassembler
    acpica-tools
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
