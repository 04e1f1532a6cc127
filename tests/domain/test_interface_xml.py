"""``<interface>`` parsed and formatted without a daemon; libvirt's test:///default driver (libvirt-python,
in this process) is the oracle for what is printed and for each refusal its parser makes. What libvirt
accepts and this driver cannot run (other types and models, more queue pairs than its virtio-net has MSI-X
vectors for) is refused naming it."""

from __future__ import annotations

import re

import libvirt
import pytest
from lxml import etree

from mshv_libvirt.domain import format_domain_xml, parse_domain_xml
from mshv_libvirt.domain.xml import NetLive, find_net, net_link_update, parse_device_xml
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError
from tests.support.oracle import inactive_xml

MAC = "<mac address='52:54:00:12:34:56'/>"


def ours_xml(devices: str) -> str:
    return (
        "<domain type='hyperv'><name>vm</name><memory>262144</memory>"
        f"<os><type arch='x86_64'>hvm</type><kernel>/k</kernel></os><devices>{devices}</devices></domain>"
    )


def theirs(ref: libvirt.virConnect, devices: str) -> str:
    """libvirt's inactive dumpxml of the same devices."""
    return inactive_xml(ref, "if-oracle", f"<devices>{devices}</devices>")


def blocks(xml: str) -> list[str]:
    return re.findall(r"^    <interface.*?</interface>\n", xml, re.S | re.M)


def error(call: object) -> tuple[int, int, str]:
    assert callable(call)
    try:
        call()
    except VirtError as e:
        return (int(e.code), int(e.domain), e.message)
    except libvirt.libvirtError as e:
        return (e.get_error_code(), e.get_error_domain(), str(e.get_error_message()))
    raise AssertionError("accepted")


@pytest.mark.parametrize(
    "iface",
    [
        f"<interface type='network'>{MAC}<source network='lan'/><model type='virtio'/></interface>",
        f"<interface type='bridge'>{MAC}<source bridge='br0'/><target dev='tap-a'/><model type='virtio'/>"
        "<driver queues='1'/><link state='down'/><mtu size='9000'/></interface>",
        f"<interface type='ethernet'>{MAC}<target dev='mytap0'/><model type='VIRTIO'/><link state='up'/></interface>",
        f"<interface type='ethernet'>{MAC}<model type='virtio-non-transitional'/><mtu size=' 1500'/></interface>",
        "<interface type='ethernet'><mac address='52:54:0:A:b:1'/><model type='virtio'/><mtu size='0'/></interface>",
        # the name libvirt generates is dropped from a definition; so are the port and bridge of a live XML
        f"<interface type='network'>{MAC}<source network='lan' portid='6b5e4dbc-41ae-4a39-9a3d-2bd3a6f6d8e1' "
        "bridge='virbr7'/><target dev='vnet3'/><model type='virtio'/><link state=''/></interface>",
        f"<interface type='bridge'>{MAC}<source bridge=''/><model type='virtio'/><driver queues=' 1'/></interface>",
        f"<interface type='ethernet'>{MAC}<model type='virtio'/><mtu size=''/></interface>",
        f"<interface type='bridge'>{MAC}<source bridge='br0'/><model type='virtio'/><driver queues='4'/></interface>",
        f"<interface type='network'>{MAC}<source network='lan'/><driver queues=' 127'/><model type='virtio'/>"
        "</interface>",
        f"<interface type='ethernet'>{MAC}<model type='virtio'/><driver queues='0'/></interface>",
    ],
)
def test_printed_as_libvirt_prints_it(ref: libvirt.virConnect, iface: str) -> None:
    cfg = parse_domain_xml(ours_xml(iface))
    # libvirt's schema refuses some of these inputs (its parser does not); what is printed it accepts
    assert parse_domain_xml(cfg.xml, check_libvirt_schema=True).xml == cfg.xml
    ours = blocks(cfg.xml)
    oracle = blocks(theirs(ref, iface))
    # The test driver names every tap testnetN at define and assigns no PCI address; the address is
    # compared with libvirt's QEMU driver's assignment below.
    oracle = [re.sub(r"      <target dev='testnet[0-9]+'/>\n", "", b) for b in oracle]
    ours = [re.sub(r"      <address type='pci'[^>]*/>\n", "", b) for b in ours]
    assert ours == oracle


@pytest.mark.parametrize(
    "iface",
    [
        "<interface type='bogus'/>",
        "<interface type='network'/>",
        "<interface type='bridge'><model type='virtio'/></interface>",
        "<interface type='network'><source/></interface>",
        "<interface type='bridge'><source network='x'/></interface>",
        "<interface type='ethernet'><mac address='zz'/></interface>",
        "<interface type='ethernet'><mac address=' 52:54:00:00:00:01'/></interface>",
        "<interface type='ethernet'><mac address='52-54-00-00-00-01'/></interface>",
        "<interface type='ethernet'><mac address='52:54:00:00:00:100'/></interface>",
        "<interface type='ethernet'><mac address='01:00:5e:00:00:01'/></interface>",
        "<interface type='ethernet'><mac address='ff:ff:ff:ff:ff:ff'/></interface>",
        "<interface type='ethernet'><model type='e 1000'/></interface>",
        "<interface type='ethernet'><model type='virtio'/><driver queues='x'/></interface>",
        "<interface type='ethernet'><model type='virtio'/><driver queues='0x2'/></interface>",
        "<interface type='ethernet'><model type='virtio'/><driver queues='-1'/></interface>",
        "<interface type='ethernet'><mtu size='x'/></interface>",
        "<interface type='ethernet'><mtu size='-1'/></interface>",
        "<interface type='ethernet'><mtu size='0x500'/></interface>",
        "<interface type='ethernet'><link state='sideways'/></interface>",
        "<interface type='ethernet'><link state='default'/></interface>",
    ],
)
def test_parser_refusals_match_libvirts(ref: libvirt.virConnect, iface: str) -> None:
    assert error(lambda: parse_domain_xml(ours_xml(iface))) == error(lambda: theirs(ref, iface))


@pytest.mark.parametrize(
    ("iface", "detail"),
    [
        ("<interface/>", "interface type 'user'"),  # libvirt's default type
        ("<interface type='user'/>", "interface type 'user'"),
        ("<interface type='direct'><source dev='eth0'/></interface>", "interface type 'direct'"),
        ("<interface type='vhostuser'/>", "interface type 'vhostuser'"),
        ("<interface type='null'/>", "interface type 'null'"),
    ],
)
def test_other_types_refused_naming_them(iface: str, detail: str) -> None:
    e = error(lambda: parse_domain_xml(ours_xml(iface)))
    assert e == (
        ErrorCode.CONFIG_UNSUPPORTED,
        ErrorDomain.DOMAIN,
        f"unsupported configuration: {detail} is not supported by the mshv driver; "
        "use type='network', type='bridge' or type='ethernet'",
    )


@pytest.mark.parametrize("model", ["e1000", "rtl8139", "virtio-transitional", "Virtio-Transitional", "vmxnet3"])
def test_other_models_refused_naming_them(model: str) -> None:
    e = error(lambda: parse_domain_xml(ours_xml(f"<interface type='ethernet'><model type='{model}'/></interface>")))
    assert e == (
        ErrorCode.CONFIG_UNSUPPORTED,
        ErrorDomain.DOMAIN,
        f"unsupported configuration: interface model '{model.lower() if 'irtio' in model else model}' "
        "is not supported by the mshv driver; use type='virtio'",
    )


@pytest.mark.parametrize(
    ("iface", "detail"),
    [
        (
            "<interface type='ethernet'><driver queues='128'/></interface>",
            "interface driver queues='128' is not supported by the mshv driver; use 1 to 127",
        ),
        (
            "<interface type='ethernet'><model type='virtio'/><driver queues='4294967295'/></interface>",
            "interface driver queues='4294967295' is not supported by the mshv driver; use 1 to 127",
        ),
        (
            "<interface type='ethernet'><mtu size='67'/></interface>",
            "interface mtu size='67' is not supported by the mshv driver; use 68 to 65535",
        ),
        (
            "<interface type='ethernet'><mtu size='65536'/></interface>",
            "interface mtu size='65536' is not supported by the mshv driver; use 68 to 65535",
        ),
        (
            "<interface type='ethernet'><driver name='vhost'/></interface>",
            "attribute 'name' of <interface><driver> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><mac address='52:54:00:00:00:01' type='static'/></interface>",
            "attribute 'type' of <interface><mac> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><target dev='t0' managed='no'/></interface>",
            "attribute 'managed' of <interface><target> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><source bridge='br0'/></interface>",
            "element <source> in <interface type='ethernet'> is not supported by the mshv driver",
        ),
        (
            "<interface type='network'><source network='n' portgroup='p'/></interface>",
            "attribute 'portgroup' of <interface><source> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><target dev=''/></interface>",
            "an empty <target dev> in <interface> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><alias name='ua-nic'/></interface>",
            "interface alias 'ua-nic' is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><boot order='1'/></interface>",
            "element <boot> in <interface> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><bandwidth><inbound average='1'/></bandwidth></interface>",
            "element <bandwidth> in <interface> is not supported by the mshv driver",
        ),
        (
            "<interface type='ethernet'><mtu size='1500'/><mtu size='1400'/></interface>",
            "more than one <mtu> in <interface> is not supported by the mshv driver",
        ),
    ],
)
def test_what_the_driver_cannot_run_is_refused_naming_it(iface: str, detail: str) -> None:
    e = error(lambda: parse_domain_xml(ours_xml(iface)))
    assert e == (ErrorCode.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN, f"unsupported configuration: {detail}")


def test_a_mac_is_generated_in_libvirts_prefix_and_kept() -> None:
    cfg = parse_domain_xml(ours_xml("<interface type='ethernet'/><interface type='ethernet'/>"))
    macs = [n.mac for n in cfg.nets]
    assert all(re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", m) for m in macs), macs
    assert [f"<mac address='{m}'/>" in cfg.xml for m in macs] == [True, True]
    # the stored definition is read back with the same addresses (nothing generated again)
    assert [n.mac for n in parse_domain_xml(cfg.xml).nets] == macs
    assert [n.mac for n in parse_domain_xml(cfg.xml, trusted=True).nets] == macs
    # libvirt's default model is filled in and printed
    assert cfg.xml.count("<model type='virtio'/>") == 2


def test_interfaces_are_addressed_before_disks_and_rngs() -> None:
    # qemuDomainAssignDevicePCISlots: network interfaces, then disks, then rngs; explicit slots kept.
    cfg = parse_domain_xml(
        ours_xml(
            "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
            "<disk type='file'><source file='/d.img'/><target dev='vda' bus='virtio'/></disk>"
            "<interface type='ethernet'/>"
            "<interface type='bridge'><source bridge='br0'/>"
            "<address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></interface>"
        )
    )
    assert [n.address.slot for n in cfg.nets] == [3, 2]
    assert [d.address.slot for d in cfg.disks] == [4]
    assert [r.address.slot for r in cfg.rngs] == [5]


def test_a_slot_shared_with_a_disk_is_libvirts_error() -> None:
    slot = "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>"
    e = error(
        lambda: parse_domain_xml(
            ours_xml(
                f"<disk type='file'><source file='/d.img'/><target dev='vda' bus='virtio'/>{slot}</disk>"
                f"<interface type='ethernet'>{slot}</interface>"
            )
        )
    )
    assert e == (ErrorCode.XML_ERROR, ErrorDomain.DOMAIN, "XML error: Attempted double use of PCI Address 0000:00:05.0")


def test_interfaces_come_between_controllers_and_serials() -> None:
    cfg = parse_domain_xml(
        ours_xml("<serial type='pty'/><interface type='ethernet'/><controller type='usb' model='none'/>")
    )
    tags = re.findall(r"^    <([a-z]+)", cfg.xml[cfg.xml.index("<devices>") :], re.M)
    assert tags == ["controller", "interface", "serial", "console"]


def test_live_xml_shows_the_tap_the_port_and_the_alias_and_defines_again() -> None:
    cfg = parse_domain_xml(
        ours_xml(
            f"<interface type='network'>{MAC}<source network='lan'/></interface>"
            "<interface type='ethernet'><mac address='52:54:00:00:00:02'/><target dev='mytap'/></interface>"
            "<interface type='bridge'><mac address='52:54:00:00:00:03'/><source bridge='br0'/></interface>"
        )
    )
    live = format_domain_xml(
        cfg,
        domain_id=4,
        nets=[
            NetLive("vnet5", portid="6b5e4dbc-41ae-4a39-9a3d-2bd3a6f6d8e1", bridge="virbr7"),
            NetLive("mytap"),
            None,
        ],
    )
    assert blocks(live) == [
        "    <interface type='network'>\n"
        "      <mac address='52:54:00:12:34:56'/>\n"
        "      <source network='lan' portid='6b5e4dbc-41ae-4a39-9a3d-2bd3a6f6d8e1' bridge='virbr7'/>\n"
        "      <target dev='vnet5'/>\n"
        "      <model type='virtio'/>\n"
        "      <alias name='net0'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>\n"
        "    </interface>\n",
        "    <interface type='ethernet'>\n"
        "      <mac address='52:54:00:00:00:02'/>\n"
        "      <target dev='mytap'/>\n"
        "      <model type='virtio'/>\n"
        "      <alias name='net1'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n"
        "    </interface>\n",
        "    <interface type='bridge'>\n"
        "      <mac address='52:54:00:00:00:03'/>\n"
        "      <source bridge='br0'/>\n"
        "      <model type='virtio'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>\n"
        "    </interface>\n",
    ]
    # virsh dumpxml of a running domain, defined again: the runtime parts go, as with libvirt
    assert parse_domain_xml(live, check_libvirt_schema=True).xml == cfg.xml
    assert format_domain_xml(cfg) == cfg.xml


TWO = (
    "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='lan'/></interface>"
    "<interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='br0'/></interface>"
)


def device(xml: str) -> etree._Element:
    return parse_device_xml(xml)


@pytest.mark.parametrize(
    ("iface", "found"),
    [
        ("<interface type='bridge'><mac address='52:54:00:00:00:02'/><source bridge='x'/></interface>", 1),
        ("<interface type='network'><mac address='52:54:0:0:0:1'/><source network='lan'/></interface>", 0),
        (
            "<interface type='ethernet'><address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>"
            "</interface>",
            1,
        ),
    ],
)
def test_an_interface_is_found_by_its_mac_and_address(iface: str, found: int) -> None:
    assert find_net(parse_domain_xml(ours_xml(TWO)), device(iface)) == found


@pytest.mark.parametrize(
    ("iface", "code", "message"),
    [
        (
            "<interface type='ethernet'><mac address='52:54:00:00:00:09'/></interface>",
            ErrorCode.DEVICE_MISSING,
            "device not found: no device matching MAC address 52:54:00:00:00:09 found",
        ),
        (
            "<interface type='ethernet'><mac address='52:54:00:00:00:01'/>"
            "<address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></interface>",
            ErrorCode.DEVICE_MISSING,
            "device not found: no device matching MAC address 52:54:00:00:00:01 found on 0000:00:03.0",
        ),
        (
            "<interface type='ethernet'><address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>"
            "</interface>",
            ErrorCode.DEVICE_MISSING,
            "device not found: no device found on 0000:00:09.0",
        ),
        (
            "<interface type='ethernet'/>",
            ErrorCode.OPERATION_FAILED,
            "operation failed: multiple matching devices found",
        ),
    ],
)
def test_what_matches_no_interface_or_several_is_libvirts_error(iface: str, code: ErrorCode, message: str) -> None:
    e = error(lambda: find_net(parse_domain_xml(ours_xml(TWO)), device(iface)))
    assert e == (code, ErrorDomain.DOMAIN, message)


def test_an_update_changes_the_link_state_only() -> None:
    cfg = parse_domain_xml(ours_xml(TWO))
    live = format_domain_xml(cfg, domain_id=1, nets=[NetLive("vnet0", "6b5e4dbc-41ae-4a39-9a3d-2bd3a6f6d8e1", "br7")])
    # virsh domif-setlink sends the live XML's element with <link> changed
    first = blocks(live)[0].replace("<model type='virtio'/>", "<model type='virtio'/><link state='down'/>")
    assert net_link_update(cfg, device(first)) == (0, "down")
    assert net_link_update(cfg, device(blocks(cfg.xml)[1])) == (1, "up")
    changed = blocks(cfg.xml)[1].replace("<source bridge='br0'/>", "<source bridge='br1'/>")
    assert error(lambda: net_link_update(cfg, device(changed))) == (
        ErrorCode.OPERATION_UNSUPPORTED,
        ErrorDomain.DOMAIN,
        "Operation not supported: cannot modify network device bridge of the interface with MAC address "
        "52:54:00:00:00:02 (the mshv driver changes only its link state)",
    )
