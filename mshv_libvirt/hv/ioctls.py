"""Every /dev/mshv request the project issues, grouped by the fd it is issued on.

Values come from the compiled module (the C compiler evaluates _IOW/_IOWR on our own
declarations), never from hand-written hex. Requests are only ever added: a retired call moves
to the "deprecated" group and stays.
"""

from __future__ import annotations

from . import _ffi

# /dev/mshv fd
MSHV_CREATE_PARTITION = _ffi.const("MSHV_CREATE_PARTITION")  # 6.15; v2 layout via pt_flags bit 3 (6.19)

# partition fd
MSHV_INITIALIZE_PARTITION = _ffi.const("MSHV_INITIALIZE_PARTITION")  # 6.15
MSHV_CREATE_VP = _ffi.const("MSHV_CREATE_VP")  # 6.15
MSHV_SET_GUEST_MEMORY = _ffi.const("MSHV_SET_GUEST_MEMORY")  # 6.15
MSHV_IRQFD = _ffi.const("MSHV_IRQFD")  # 6.15
MSHV_IOEVENTFD = _ffi.const("MSHV_IOEVENTFD")  # 6.15
MSHV_SET_MSI_ROUTING = _ffi.const("MSHV_SET_MSI_ROUTING")  # 6.15
MSHV_GET_GPAP_ACCESS_BITMAP = _ffi.const("MSHV_GET_GPAP_ACCESS_BITMAP")  # 6.15

# partition fd and VP fd (6.15); /dev/mshv, self-targeted (6.19)
MSHV_ROOT_HVCALL = _ffi.const("MSHV_ROOT_HVCALL")

# VP fd
MSHV_RUN_VP = _ffi.const("MSHV_RUN_VP")  # 6.15
MSHV_GET_VP_STATE = _ffi.const("MSHV_GET_VP_STATE")  # 6.15
MSHV_SET_VP_STATE = _ffi.const("MSHV_SET_VP_STATE")  # 6.15

# deprecated: none yet

NAMES = {name: value for name, value in globals().items() if name.startswith("MSHV_") and isinstance(value, int)}
