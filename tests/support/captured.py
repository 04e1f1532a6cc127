"""Packets captured byte for byte from virsh 9.0.0 talking to libvirtd 9.0.0 (Debian 12) on its UNIX socket.

Their layout is libvirt's: the header of src/rpc/virnetprotocol.x (length word, program, version,
procedure, type, serial, status), the keepalive program of src/rpc/virkeepaliveprotocol.x (PING 1, PONG 2)
and the calls of src/remote/remote_protocol.x; docs/DAEMON.md ("RPC layering") says what the daemon does
with them.
"""

from __future__ import annotations

# virsh's CONNECT_OPEN("mshv:///system"), 56 bytes, as captured.
CONNECT_OPEN = bytes.fromhex(
    "00000038 20008086 00000001 00000001 00000000 00000002 00000000"
    "00000001 0000000e 6d736876 3a2f2f2f 73797374 656d0000 00000000".replace(" ", "")
)
# libvirt's keepalive program: PING from virsh, PONG from libvirtd.
PING = bytes.fromhex("0000001c 6b656570 00000001 00000001 00000002 00000000 00000000".replace(" ", ""))
PONG = bytes.fromhex("0000001c 6b656570 00000001 00000002 00000002 00000000 00000000".replace(" ", ""))
