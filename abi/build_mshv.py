"""cffi builder for ``mshv_libvirt._mshv`` (API mode).

The C compiler, not Python, decides every layout and ioctl number: the same headers in
abi/include/ are compiled into the module and, through a small filter, become the cdef.
Computed macros (ioctl numbers, masks written as expressions) turn into ``#define X ...``
so cffi asks the compiler for their values.
"""

from __future__ import annotations

import re
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
EMU = HERE / "emu"
HEADERS = ["mshv_uapi.h", "hv_defs.h"]

_DEFINE = re.compile(r"^#define\s+(\w+)\s+(.*?)\s*$")
_INT_LITERAL = re.compile(r"^(0[xX][0-9a-fA-F]+|\d+)[uUlL]*$")


def cdef_from_header(text: str) -> str:
    """Reduce a project header to what cffi's cdef parser accepts."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            m = _DEFINE.match(stripped)
            if not m or m.group(1).endswith("_H"):
                continue
            name, value = m.groups()
            out.append(f"#define {name} {value}" if _INT_LITERAL.match(value) else f"#define {name} ...")
            continue
        out.append(line)
    return "\n".join(out)


SHIM_CDEF = """
int mshv_dev_open(int mode);
int mshv_dev_is_emulated(int fd);
long mshv_dev_ioctl(int fd, unsigned long request, void *arg);
int mshv_dev_close(int fd);
void *mshv_dev_mmap(void *addr, size_t len, int prot, int flags, int fd, long offset);
int mshv_emu_kvm_available(void);
int mshv_emu_kernel(int fd);
void *mshv_alloc_pages(size_t len);
int mshv_free_pages(void *addr, size_t len);
int mshv_install_kick_handler(int signo);
static const char *const mshv_libvirt_version;
"""


def _version() -> str:
    init = (HERE.parent / "mshv_libvirt" / "__init__.py").read_text()
    m = re.search(r'__version__ = "([^"]+)"', init)
    assert m, "mshv_libvirt/__init__.py must define __version__"
    return m.group(1)


ffibuilder = cffi.FFI()
ffibuilder.cdef("\n".join(cdef_from_header((INCLUDE / h).read_text()) for h in HEADERS) + SHIM_CDEF)

_sources = [str(HERE / "shim.c"), *sorted(str(p) for p in EMU.glob("*.c"))]
ffibuilder.set_source(
    "mshv_libvirt._mshv",
    "\n".join(f'#include "{h}"' for h in HEADERS)
    + '\n#include "emu.h"\n#include "shim.h"\n'
    + f'static const char *const mshv_libvirt_version = "{_version()}";\n',
    sources=[str(Path(s).relative_to(HERE.parent)) for s in _sources],
    include_dirs=[str(INCLUDE.relative_to(HERE.parent)), str(EMU.relative_to(HERE.parent)), "abi"],
    extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
