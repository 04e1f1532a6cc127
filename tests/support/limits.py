"""The limits the tests expect, stated here and not imported from the code under test, each with its source:
libvirt 9.0's protocol files, Linux's headers, or the project's own documentation (where the limit is the
project's choice). A test built on these fails when the implementation's constant drifts from its source;
tests/test_limits.py also compares them directly, naming the source of the one that differs.
"""

from __future__ import annotations

# -- libvirt's RPC: src/rpc/virnetprotocol.x and src/remote/remote_protocol.x (libvirt 9.0) ---------------

# VIR_NET_MESSAGE_LEN_MAX (= VIR_NET_MESSAGE_HEADER_XDR_LEN): the length word that starts every packet and
# counts itself.
LEN_WORD = 4
# VIR_NET_MESSAGE_HEADER_MAX: struct virNetMessageHeader serialised (prog, vers, proc, type, serial,
# status: six 4-byte XDR words).
HEADER_MAX = 24
HEADER_SIZE = LEN_WORD + HEADER_MAX  # 28: the smallest valid packet, its length word included
# REMOTE_STRING_MAX (remote_protocol.x; VIR_NET_MESSAGE_STRING_MAX in virnetprotocol.x is the same): the
# longest remote_nonnull_string, in bytes.
STRING_MAX = 4194304
# libvirt's own packet bound, VIR_NET_MESSAGE_MAX (32 MiB since libvirt 5.x; 16 MiB before): only to say
# that the daemon's is smaller.
LIBVIRT_MESSAGE_MAX = 33554432

# -- the daemon's own RPC bound: docs/DAEMON.md, "RPC layering" ---------------------------------------------

# "A bad header (length < 28 or > 4 MiB + 4 KiB ...)": a packet as long as a maximal string plus headroom
# for the rest of a call, not libvirt's 32 MiB.
MAX_PACKET = 4 * 1024 * 1024 + 4 * 1024

# docs/DAEMON.md, "server.py": "512 clients (256 on the read-only socket)"
MAX_CLIENTS = 512
MAX_RO_CLIENTS = 256

# docs/DAEMON.md, "Domain stats": "asked in parallel, at most 8 VMMs at once for one call"
STATS_QUERIES = 8

# -- Linux -------------------------------------------------------------------------------------------------

# struct sockaddr_un's sun_path is 108 bytes (UNIX_PATH_MAX, include/uapi/linux/un.h; unix(7)); a path
# passed to bind/connect as a C string keeps one for its terminating NUL.
SUN_PATH_MAX = 107
# NAME_MAX (include/uapi/linux/limits.h): the longest file name, in bytes.
NAME_MAX = 255

# -- the on-disk layout: docs/DAEMON.md, "On-disk layout" -------------------------------------------------

# "a name whose escaped form is at most 240 bytes of UTF-8"
MAX_ESCAPED_NAME_BYTES = 240
# "with the id (at most ten digits)": an unsigned 32-bit id, the longest runtime directory name
MAX_DOMAIN_ID = 4294967295
CONTROL = "ctl"  # "`ctl` (control socket)", in every runtime directory
# "a run directory may be 92 bytes long": the rest of the longest control socket path, "/4294967295/ctl"
MAX_RUN_DIR_BYTES = SUN_PATH_MAX - len(f"/{MAX_DOMAIN_ID}/{CONTROL}")

# -- domain XML bounds: docs/DAEMON.md, "Driver" ("bounds first (1 MiB, 5000 elements, 256 attributes per
# element, depth 64, 1 000 000 characters ...)") ------------------------------------------------------------

MAX_XML_BYTES = 1024 * 1024
MAX_ELEMENTS = 5000
MAX_ATTRIBUTES = 256
MAX_DEPTH = 64
MAX_TEXT_CHARS = 1_000_000
