#!/usr/bin/env bash
# A first VM in one command: builds the project's tiny test guest (a few hundred bytes of x86-64
# assembly wrapped in a real bzImage, tests/support/guests.py) into ~/.cache/mshv-libvirt, writes a
# domain XML for it, then runs (and prints) the `virsh define` and `virsh start` lines.
#
#   scripts/first-vm.sh [--uri URI] [--name NAME] [--irq] [--print]
#
#   --uri URI    libvirt URI (default: $MSHV_LIBVIRT_URI, else mshv:///system)
#   --name NAME  domain name (default: first-vm)
#   --irq        boot the guest's interrupt-driven mode ("tiny.irq" on its command line)
#   --print      build and print, but define and start nothing
#
# Needs binutils (as, ld, objcopy, nm) and python3; a running virtmshvd (scripts/install.sh).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
uri=${MSHV_LIBVIRT_URI:-mshv:///system}
name=first-vm
cmdline="console=ttyS0"
run=1

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
while (($#)); do
    case $1 in
        --uri) uri=${2:?--uri needs a value}; shift 2 ;;
        --uri=*) uri=${1#--uri=}; shift ;;
        --name) name=${2:?--name needs a value}; shift 2 ;;
        --name=*) name=${1#--name=}; shift ;;
        --irq) cmdline="$cmdline tiny.irq"; shift ;;
        --print) run=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "first-vm.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
# The name goes into XML and shell lines below: keep it to what needs no quoting.
if [[ ! $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
    echo "first-vm.sh: --name must be letters, digits, '_', '.' or '-' (got '$name')" >&2
    exit 2
fi

kernel=$(cd "$src" && python3 -m tests.support.guests tiny)
xml="$(dirname "$(dirname "$kernel")")/$name.xml"
uuid=""
if ((run)) && existing=$(virsh -q -c "$uri" domuuid "$name" 2>/dev/null); then
    uuid="<uuid>$existing</uuid>"  # defined before: define again updates that domain
fi
cat >"$xml" <<EOF
<domain type='hyperv'>
  <name>$name</name>$uuid
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>$kernel</kernel>
    <cmdline>$cmdline</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <serial type='pty'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
EOF

echo "tiny guest: $kernel"
echo "domain XML: $xml"
echo "virsh -c '$uri' define '$xml'"
echo "virsh -c '$uri' start $name"
if ((run)); then
    virsh -c "$uri" define "$xml"
    if [ "$(virsh -c "$uri" domstate "$name")" = running ]; then
        echo "$name is already running"
    else
        virsh -c "$uri" start "$name"
    fi
fi
cat <<EOF
Then:
  virsh -c '$uri' console $name     the guest echoes what you type, except its command keys:
                                     q power off, r reset, c panic, f triple fault, b exit benchmark,
                                     i IOAPIC version, n interrupt counters, d PCI scan,
                                     v entropy from its virtio-rng device, g RTC time,
                                     j virtio-blk write and read back (with a disk),
                                     u virtio-net frames sent and counted (with an interface); Ctrl+] leaves
  virsh -c '$uri' shutdown $name    presses its ACPI power button (it powers off)
  virsh -c '$uri' undefine $name    forgets it
EOF
