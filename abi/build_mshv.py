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
VMM = HERE / "vmm"
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
void *mshv_alloc_memfd_pages(size_t len, int *fd_out);
int mshv_free_pages(void *addr, size_t len);
int mshv_spawn_helper(const char *path, char *const argv[], const int *keep, int nkeep, int *lifeline_out,
                      int *reaper_out, int *reaper_pidfd_out);
int mshv_install_kick_handler(int signo);
int mshv_dev_use_fd(int kind, int fd);
void mshv_emu_prestart(void);
static const char *const mshv_libvirt_version;
"""

# The compiled VMM parts (abi/vmm/*.h: sandbox, virtio-net and virtio-blk threads, test-only queue drivers,
# the run loop): plain C declarations cffi parses as they are, comments and preprocessor lines dropped.
VMM_HEADERS = sorted(p.name for p in VMM.glob("*.h"))
VMM_CDEF = "\n".join(
    line
    for h in VMM_HEADERS
    for line in (VMM / h).read_text().splitlines()
    if line and not line.startswith(("#", "/*", " *"))
)
# (Its MSHV_SANDBOX_* kinds stay out of the module: it exports only upstream ABI constants; vmm/sandbox.py
# names them, and tests/vmm/test_sandbox_native.py checks the vCPU kind by its report.)

_UNISTD = ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h")


def syscall_names_source() -> str:
    """The system call name table the SIGSYS handler reports with (index = number, from the kernel headers)."""
    names: dict[int, str] = {}
    for header in _UNISTD:
        if Path(header).exists():
            for m in re.finditer(r"^#define __NR_(\w+) (\d+)$", Path(header).read_text(), re.M):
                names[int(m.group(2))] = m.group(1)
            break
    size = max(names, default=-1) + 1
    body = ", ".join(f'[{nr}] = "{name}"' for nr, name in sorted(names.items()))
    table = f"const char *const mshv_syscall_names[{max(size, 1)}] = {{{body}}};\n"
    return table + f"const int mshv_syscall_names_len = {size};\n"


def _version() -> str:
    init = (HERE.parent / "mshv_libvirt" / "__init__.py").read_text()
    m = re.search(r'__version__ = "([^"]+)"', init)
    assert m, "mshv_libvirt/__init__.py must define __version__"
    return m.group(1)


ffibuilder = cffi.FFI()
ffibuilder.cdef("\n".join(cdef_from_header((INCLUDE / h).read_text()) for h in HEADERS) + SHIM_CDEF + VMM_CDEF)

_sources = [str(HERE / "shim.c"), *sorted(str(p) for p in EMU.glob("*.c")), *sorted(str(p) for p in VMM.glob("*.c"))]
ffibuilder.set_source(
    "mshv_libvirt._mshv",
    "\n".join(f'#include "{h}"' for h in HEADERS)
    + "\n"
    + "".join(f'#include "{h}"\n' for h in ("emu.h", "shim.h", *VMM_HEADERS))
    + f'static const char *const mshv_libvirt_version = "{_version()}";\n'
    + syscall_names_source(),
    sources=[str(Path(s).relative_to(HERE.parent)) for s in _sources],
    include_dirs=[str(d.relative_to(HERE.parent)) for d in (INCLUDE, EMU, VMM)] + ["abi"],
    extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
