"""virtio-net on the virtio-pci transport (vmm/devices/virtio/net.py): a driver programs the device as
Linux does, the compiled I/O thread moves frames between guest RAM and a tap in a test namespace."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mshv_libvirt.domain.xml import NET_MAX_QUEUES
from mshv_libvirt.vmm import builder
from mshv_libvirt.vmm.config import NET_MAX_QUEUE_PAIRS, ConfigError, VmmConfig
from mshv_libvirt.vmm.devices.bus import Bus
from mshv_libvirt.vmm.devices.virtio import net as vnet
from mshv_libvirt.vmm.devices.virtio import pci as vpci
from mshv_libvirt.vmm.devices.virtio.queue import DeviceMemory
from mshv_libvirt.vmm.interrupts import MsiRouting
from mshv_libvirt.vmm.vhost_user import MemRegion
from tests.support.netns import NetNs, netns
from tests.support.virtio_rig import partition_with_ram, place_on_root_bus
from tests.support.waits import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

QSIZE = 8
# receiveq1, transmitq1, receiveq2, transmitq2, controlq (of a two-pair device)
RINGS = [(0x10_0000 + 0x1_0000 * n, 0x10_1000 + 0x1_0000 * n, 0x10_2000 + 0x1_0000 * n) for n in range(5)]
BUFS = 0x20_0000
MAC = "52:54:00:ab:cd:ef"
ETHERTYPE = 0x88B5


@dataclass
class Rig:
    ram: builder.GuestRam
    mmio: Bus
    function: vpci.VirtioPciFunction
    net: vnet.VirtioNet
    peer: socket.socket
    ns: NetNs

    @property
    def bar(self) -> int:
        assert self.function.mapped_at is not None
        return self.function.mapped_at

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(self.bar + vpci.COMMON_OFFSET + offset, size, value)

    def common_read(self, offset: int, size: int) -> int:
        return self.mmio.read(self.bar + vpci.COMMON_OFFSET + offset, size)

    def device_cfg(self, offset: int, size: int) -> int:
        return self.mmio.read(self.bar + vpci.DEVICE_OFFSET + offset, size)

    def offered(self) -> int:
        value = 0
        for select in (0, 1):
            self.common_write(vpci.DEVICE_FEATURE_SELECT, 4, select)
            value |= self.common_read(vpci.DEVICE_FEATURE, 4) << (32 * select)
        return value

    def driver_init(self, features: int, queues: int = 2) -> None:
        self.common_write(vpci.DEVICE_STATUS, 1, 0)
        self.common_write(vpci.DEVICE_STATUS, 1, 3)
        for select in (0, 1):
            self.common_write(vpci.DRIVER_FEATURE_SELECT, 4, select)
            self.common_write(vpci.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFFFFFF)
        self.common_write(vpci.DEVICE_STATUS, 1, 0xB)
        assert self.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_FEATURES_OK
        for n, (desc, avail, used) in enumerate(RINGS[:queues]):
            self.common_write(vpci.QUEUE_SELECT, 2, n)
            self.common_write(vpci.QUEUE_SIZE, 2, QSIZE)
            for reg, addr in ((vpci.QUEUE_DESC, desc), (vpci.QUEUE_DRIVER, avail), (vpci.QUEUE_DEVICE, used)):
                self.common_write(reg, 8, addr)
            self.common_write(vpci.QUEUE_ENABLE, 2, 1)
        self.common_write(vpci.DEVICE_STATUS, 1, 0xF)

    def post(self, q: int, slot: int, gpa: int, length: int, flags: int) -> None:
        desc, avail, _ = RINGS[q]
        self.ram.write(desc + 16 * slot, struct.pack("<QIHH", gpa, length, flags, 0))
        self.ram.write(avail + 4 + 2 * slot, struct.pack("<H", slot))
        self.ram.write(avail + 2, struct.pack("<H", slot + 1))
        os.eventfd_write(self.function.kicks[q], 1)

    def used(self, q: int) -> int:
        return int(struct.unpack("<H", self.ram.read(RINGS[q][2] + 2, 2))[0])

    def command(self, slot: int, cls: int, op: int, data: bytes) -> int:
        """One control-queue command as Linux's virtnet_send_command lays it out (header, data, ack: three
        descriptors chained); waits for the device to use it and returns the ack byte."""
        q = self.ctrl
        desc, avail, _ = RINGS[q]
        at = BUFS + 0x30000 + 0x1000 * slot
        self.ram.write(at, bytes([cls, op]) + data + bytes([0xEE]))
        ack = at + 2 + len(data)
        base = 3 * (slot % 2)  # the previous command's descriptors are free again once it was used
        chain = [(at, 2, 1), (at + 2, len(data), 1), (ack, 1, 2)]
        for i, (gpa, length, flags) in enumerate(chain):
            nxt = base + i + 1 if flags & 1 else 0
            self.ram.write(desc + 16 * (base + i), struct.pack("<QIHH", gpa, length, flags, nxt))
        self.ram.write(avail + 4 + 2 * (slot % QSIZE), struct.pack("<H", base))
        self.ram.write(avail + 2, struct.pack("<H", slot + 1))
        # as Linux's virtqueue_kick_prepare: with EVENT_IDX only when the device's avail_event asks for it
        (event,) = struct.unpack("<H", self.ram.read(RINGS[q][2] + 4 + 8 * QSIZE, 2))
        if not self.event_idx or (slot - event) & 0xFFFF < 1:  # vring_need_event(event, slot + 1, slot)
            os.eventfd_write(self.function.kicks[q], 1)
        wait_for(lambda: self.used(q) == slot + 1, timeout=10, what=f"control command {slot} used")
        return self.ram.read(ack, 1)[0]

    ctrl = 2  # the control queue's index: 2N with MQ negotiated
    event_idx = False  # the driver kicks as EVENT_IDX says


@contextlib.contextmanager
def rig(mtu: int | None = 1500, pairs: int = 1) -> Iterator[Rig]:
    with (
        netns("vnet") as ns,
        builder.open_hypervisor("emulated") as system,
        contextlib.ExitStack() as stack,
    ):
        tap, *queue_fds = ns.open_tap_queues("vt1", pairs)
        for fd in (tap, *queue_fds):
            stack.callback(os.close, fd)
        peer = ns.packet_socket("vt1")
        stack.callback(peer.close)
        partition, ram = partition_with_ram(system, 16 << 20, stack)
        regions = [MemRegion(r.gpa, r.size, mem.address, mem.fd) for r, mem in ram.regions]
        net = vnet.VirtioNet(tap, vnet.parse_mac(MAC), regions, mtu=mtu, queue_fds=queue_fds)
        stack.callback(net.stop)
        mmio = Bus("mmio")
        function = vpci.VirtioPciFunction(net, DeviceMemory(ram), MsiRouting(partition), partition, mmio)
        stack.callback(function.close)
        stack.callback(net.reset)
        place_on_root_bus(function, 5, 16 << 20)
        net.start(function)
        yield Rig(ram, mmio, function, net, peer, ns)


def frame(payload: bytes) -> bytes:
    return bytes.fromhex("ffffffffffff525400abcdef") + struct.pack("!H", ETHERTYPE) + payload


def test_identity_config_and_features() -> None:
    with rig() as r:
        assert r.function.config.read(0, 4) == 0x1041_1AF4  # modern virtio-net
        assert bytes(r.device_cfg(i, 1) for i in range(6)) == vnet.parse_mac(MAC)
        assert r.device_cfg(6, 2) == vnet.S_LINK_UP
        assert r.device_cfg(10, 2) == 1500
        offered = r.offered()
        for bit in (vnet.F_MAC, vnet.F_STATUS, vnet.F_MTU, vnet.F_CSUM, vpci.F_EVENT_IDX, vpci.F_VERSION_1):
            assert offered & bit
        assert offered & vnet.F_GUEST_CSUM  # a Linux tap accepts TUNSETOFFLOAD


def test_link_down_is_status_and_a_config_change() -> None:
    with rig() as r:
        generation = r.common_read(vpci.CONFIG_GENERATION, 1)
        r.net.set_link(False)
        assert r.device_cfg(6, 2) == 0
        assert r.common_read(vpci.CONFIG_GENERATION, 1) == (generation + 1) & 0xFF
        assert r.function.isr & vpci.ISR_CONFIG
        assert r.net.to_dict() == {"version": vnet.STATE_VERSION, "link_up": False, "activations": 0}


def test_frames_through_the_transport_both_ways() -> None:
    with rig() as r:
        r.driver_init(vpci.F_VERSION_1 | vnet.F_MAC | vnet.F_STATUS)
        assert r.net.activations == 1
        r.post(0, 0, BUFS, 2048, 2)
        sent = frame(b"guest-bound" * 30)
        r.peer.send(sent)
        wait_for(lambda: r.used(0) == 1, timeout=10, what="rx buffer used")
        (length,) = struct.unpack("<I", r.ram.read(RINGS[0][2] + 8, 4))
        assert r.ram.read(BUFS + 12, length - 12) == sent
        out = frame(b"host-bound" * 30)
        r.ram.write(BUFS + 0x10000, bytes(12) + out)
        r.post(1, 0, BUFS + 0x10000, 12 + len(out), 0)
        r.peer.settimeout(5)
        while (data := r.peer.recv(4096))[12:14] != struct.pack("!H", ETHERTYPE):
            pass
        assert data == out
        # (the tx count follows writev, which may return after the peer read the frame)
        wait_for(lambda: r.net.stats()["tx_packets"] == 1, timeout=5, what=r.net.stats)
        assert r.net.stats()["rx_packets"] == 1


def test_a_hostile_buffer_needs_a_reset() -> None:
    with rig() as r:
        r.driver_init(vpci.F_VERSION_1 | vnet.F_MAC)
        r.post(0, 0, (16 << 20) - 100, 2048, 2)  # runs past the end of guest RAM
        r.peer.send(frame(b"x" * 60))
        wait_for(lambda: r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_NEEDS_RESET, timeout=10, what="reset")
        assert r.net.error is not None and "outside guest RAM" in r.net.error
        assert r.used(0) == 0


BASE = {"name": "n", "memory_bytes": 64 << 20, "kernel": "/k"}


@pytest.mark.parametrize(
    ("net", "message"),
    [
        ([{"slot": 3, "fd": 5}], "config field 'net' must be a list of objects"),
        ([{"slot": 0, "fd": 5, "mac": MAC}], "'net.slot' must be a PCI slot"),
        ([{"slot": 3, "fd": -1, "mac": MAC}], "'net.fd' must be a descriptor"),
        ([{"slot": 3, "fd": 5, "mac": "52:54:00:ab:cd"}], "'net.mac' must be a MAC"),
        ([{"slot": 3, "fd": 5, "mac": "01:54:00:ab:cd:ef"}], "must not be a multicast"),
        ([{"slot": 3, "fd": 5, "mac": MAC, "mtu": 20}], "'net.mtu' must be between"),
        ([{"slot": 3, "fd": 5, "mac": MAC, "link_up": 1}], "'net.link_up' must be a boolean"),
        ([{"slot": 3, "fd": 5, "mac": MAC}, {"slot": 3, "fd": 6, "mac": MAC}], "two devices in one PCI slot"),
        ([{"slot": 3, "fd": 5, "mac": MAC, "queue_fds": [-1]}], "'net.queue_fds' must be a list of at most 126"),
        ([{"slot": 3, "fd": 5, "mac": MAC, "queue_fds": 6}], "'net.queue_fds' must be a list"),
        ([{"slot": 3, "fd": 5, "mac": MAC, "queue_fds": [6] * 127}], "'net.queue_fds' must be a list of at most 126"),
    ],
)
def test_config_validation(net: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VmmConfig.from_dict({**BASE, "net": net})


def test_config_slot_shared_with_a_disk_is_refused() -> None:
    with pytest.raises(ConfigError, match="'rng', 'disks' and 'net' put two devices in one PCI slot"):
        VmmConfig.from_dict({**BASE, "disks": [{"slot": 3, "path": "/d"}], "net": [{"slot": 3, "fd": 5, "mac": MAC}]})
    cfg = VmmConfig.from_dict({**BASE, "net": [{"slot": 4, "fd": 5, "mac": MAC.upper(), "mtu": 9000}]})
    assert cfg.net[0].mac == MAC and cfg.net[0].mtu == 9000 and cfg.net[0].link_up and cfg.net[0].fds == (5,)
    cfg = VmmConfig.from_dict({**BASE, "net": [{"slot": 4, "fd": 5, "mac": MAC, "queue_fds": list(range(6, 132))}]})
    assert cfg.net[0].fds == tuple(range(5, 132))  # 127 pairs: the most the MSI-X window has vectors for


def ethertype_frames(sock: socket.socket, timeout: float) -> bytes:
    """The next frame of ETHERTYPE the peer's socket sees (the kernel's own chatter skipped)."""
    sock.settimeout(timeout)
    while (data := sock.recv(4096))[12:14] != struct.pack("!H", ETHERTYPE):
        pass
    return data


def test_one_pair_offers_the_control_queue_without_mq() -> None:
    with rig() as r:
        assert r.common_read(vpci.NUM_QUEUES, 2) == 3  # receiveq1, transmitq1, controlq
        offered = r.offered()
        assert offered & vnet.F_CTRL_VQ and offered & vnet.F_CTRL_RX and offered & vnet.F_CTRL_MAC_ADDR
        assert not offered & vnet.F_MQ
        assert r.device_cfg(8, 2) == 1  # max_virtqueue_pairs
        features = vpci.F_VERSION_1 | vnet.F_MAC | vnet.F_CTRL_VQ | vnet.F_CTRL_RX | vnet.F_CTRL_MAC_ADDR
        r.driver_init(features, queues=3)
        assert r.command(0, vnet.CTRL_RX, vnet.CTRL_RX_PROMISC, b"\0") == vnet.CTRL_OK
        assert r.command(1, vnet.CTRL_RX, vnet.CTRL_RX_ALLMULTI, b"\1") == vnet.CTRL_OK
        assert r.net.rx_mode == {"promisc": False, "allmulti": True}
        new_mac = bytes.fromhex("525400aabbcc")
        assert r.command(2, vnet.CTRL_MAC, vnet.CTRL_MAC_ADDR_SET, new_mac) == vnet.CTRL_OK
        assert bytes(r.device_cfg(i, 1) for i in range(6)) == new_mac  # the config follows
        table = struct.pack("<I", 1) + new_mac + struct.pack("<I", 2) + bytes.fromhex("01005e000001333300000001")
        assert r.command(3, vnet.CTRL_MAC, vnet.CTRL_MAC_TABLE_SET, table) == vnet.CTRL_OK
        assert r.net.mac_table == (["52:54:00:aa:bb:cc"], ["01:00:5e:00:00:01", "33:33:00:00:00:01"])
        # refused: a short table, MQ not negotiated, an unknown class
        assert r.command(4, vnet.CTRL_MAC, vnet.CTRL_MAC_TABLE_SET, table[:-1]) == vnet.CTRL_ERR
        assert r.command(5, vnet.CTRL_MQ, vnet.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == vnet.CTRL_ERR
        assert r.command(6, 9, 0, b"") == vnet.CTRL_ERR
        assert not r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_NEEDS_RESET
        r.common_write(vpci.DEVICE_STATUS, 1, 0)  # a reset brings the configured MAC back
        assert bytes(r.device_cfg(i, 1) for i in range(6)) == vnet.parse_mac(MAC)


MQ_FEATURES = vpci.F_VERSION_1 | vnet.F_MAC | vnet.F_CTRL_VQ | vnet.F_MQ


def test_with_event_idx_the_control_queue_asks_for_every_kick() -> None:
    """Linux negotiates EVENT_IDX and kicks the control queue only when avail_event says so, then busy-waits
    for the ack: the device must move avail_event past each command it served (else the next is never
    kicked and the guest spins forever, as a Linux boot did at ipconfig's RX mode commands)."""
    with rig() as r:
        r.event_idx = True
        r.driver_init(vpci.F_VERSION_1 | vnet.F_MAC | vpci.F_EVENT_IDX | vnet.F_CTRL_VQ | vnet.F_CTRL_RX, queues=3)
        for slot in range(4):  # Linux's set_rx_mode: PROMISC, ALLMULTI, MAC_TABLE_SET, and once more
            assert r.command(slot, vnet.CTRL_RX, slot % 2, b"\1") == vnet.CTRL_OK
        (event,) = struct.unpack("<H", r.ram.read(RINGS[2][2] + 4 + 8 * QSIZE, 2))
        assert event == 4 and r.net.ctrl_commands == 4


def test_vq_pairs_set_runs_exactly_that_many_pairs_and_frames_use_pair_two() -> None:
    with rig(pairs=2) as r:
        assert r.common_read(vpci.NUM_QUEUES, 2) == 5  # two pairs and the control queue
        assert r.offered() & vnet.F_MQ and r.device_cfg(8, 2) == 2
        assert r.ns.tun_queues("vt1") == (True, 1, 1)  # before the driver: only pair 1's tap queue attached
        r.ctrl = 4
        r.driver_init(MQ_FEATURES, queues=5)
        assert r.net.pairs == 1 and r.ns.tun_queues("vt1") == (True, 1, 1)
        assert r.command(0, vnet.CTRL_MQ, vnet.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 0)) == vnet.CTRL_ERR
        assert r.command(1, vnet.CTRL_MQ, vnet.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == vnet.CTRL_ERR
        assert r.command(2, vnet.CTRL_MQ, vnet.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == vnet.CTRL_OK
        assert r.net.pairs == 2 and r.ns.tun_queues("vt1") == (True, 2, 0)  # the kernel's view
        out = frame(b"pair-two" * 20)
        r.ram.write(BUFS + 0x10000, bytes(12) + out)
        r.post(3, 0, BUFS + 0x10000, 12 + len(out), 0)  # transmitq2
        assert ethertype_frames(r.peer, 5) == out
        # the thread counts a frame once writev returned, which may be after the peer read it
        wait_for(lambda: r.net.pair_stats()[1]["tx_packets"] == 1, timeout=5, what=r.net.pair_stats)
        assert r.net.pair_stats()[0]["tx_packets"] == 0
        for q in (0, 2):
            r.post(q, 0, BUFS + 0x20000 + 0x1000 * q, 2048, 2)
        back = frame(b"to-pair-two" * 20)
        r.peer.send(back)  # the tap steers the flow to the queue it came from (tun's automq flow table)
        wait_for(lambda: r.used(0) + r.used(2) == 1, timeout=10, what="one rx buffer used")
        assert (r.used(0), r.used(2)) == (0, 1)
        assert r.ram.read(BUFS + 0x22000 + 12, len(back)) == back
        assert r.net.stats()["rx_packets"] == 1 and r.net.pair_stats()[1]["rx_packets"] == 1
        assert r.command(3, vnet.CTRL_MQ, vnet.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == vnet.CTRL_OK
        assert r.net.pairs == 1 and r.ns.tun_queues("vt1") == (True, 1, 1)
        assert not r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_NEEDS_RESET
        r.common_write(vpci.DEVICE_STATUS, 1, 0)
        assert r.net.pairs == 0 and r.ns.tun_queues("vt1") == (True, 1, 1)


def test_127_pairs_fill_the_msix_window_exactly() -> None:
    """The limit (<driver queues> 127, config's 126 queue_fds): one vector per queue and one for config changes,
    and BAR 0's MSI-X table window ends where the PBA starts."""
    with rig(pairs=127) as r:
        assert r.common_read(vpci.NUM_QUEUES, 2) == 2 * 127 + 1 and r.device_cfg(8, 2) == 127
        vectors = r.function.msix.vectors
        assert vectors == 256 and vectors * 16 == vpci.MSIX_PBA_OFFSET - vpci.MSIX_TABLE_OFFSET
        assert r.ns.tun_queues("vt1") == (True, 1, 126)
    # the same limit where the XML is checked and where the VMM's config is read
    assert vnet.MAX_QUEUE_PAIRS == NET_MAX_QUEUE_PAIRS == NET_MAX_QUEUES
