"""Packets captured from real virsh/libvirtd (shared/reference libvirt-remote.md), byte for byte."""

from __future__ import annotations

# virsh's CONNECT_OPEN("mshv:///system"), 56 bytes, as captured.
CONNECT_OPEN = bytes.fromhex(
    "00000038 20008086 00000001 00000001 00000000 00000002 00000000"
    "00000001 0000000e 6d736876 3a2f2f2f 73797374 656d0000 00000000".replace(" ", "")
)
# libvirt's keepalive program: PING from virsh, PONG from libvirtd.
PING = bytes.fromhex("0000001c 6b656570 00000001 00000001 00000002 00000000 00000000".replace(" ", ""))
PONG = bytes.fromhex("0000001c 6b656570 00000001 00000002 00000002 00000000 00000000".replace(" ", ""))
