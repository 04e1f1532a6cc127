"""The native sandbox (abi/vmm/sandbox.c) in a throw-away process: lists per thread, the SIGSYS report, Landlock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mshv_libvirt.vmm import sandbox

SIGSYS_EXIT = 128 + 31


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, cwd="/"
    )


def test_syscall_names_come_from_the_kernel_headers() -> None:
    assert sandbox.syscall_number("socket") == 41 and sandbox.syscall_number("openat") == 257
    with pytest.raises(ValueError, match="unknown system call"):
        sandbox.syscall_number("no_such_call")


def test_the_host_offers_landlock() -> None:
    # The sandbox's file isolation needs it; these hosts have it (a host without it only warns, see SECURITY.md).
    assert sandbox.landlock_abi() >= 1


def test_a_vcpu_thread_dies_on_a_call_the_main_thread_may_make() -> None:
    res = run(
        """
        import threading
        from mshv_libvirt.vmm import sandbox
        sandbox.enter()
        nr = sandbox.syscall_number("getppid")
        print("main", sandbox.issue_syscall(sandbox.syscall_number("getpid")) > 0, flush=True)
        def vcpu():
            sandbox.enter_thread(sandbox.VCPU, "vcpu7")
            sandbox.issue_syscall(nr)
            print("not reached", flush=True)
        t = threading.Thread(target=vcpu)
        t.start()
        t.join()
        """
    )
    assert res.returncode == SIGSYS_EXIT, res
    assert res.stdout == "main True\n"
    line = res.stderr.strip().splitlines()[-1]
    assert "seccomp: thread vcpu7 (tid " in line and "vCPU filter) made the forbidden system call getppid (110)" in line


def test_landlock_leaves_only_reads_beneath_the_package() -> None:
    res = run(
        """
        import os, errno
        from mshv_libvirt.vmm import sandbox
        import mshv_libvirt
        sandbox.enter()
        for path, flags in (("/etc/passwd", os.O_RDONLY), ("/tmp/x-sandbox-probe", os.O_WRONLY | os.O_CREAT)):
            try:
                os.open(path, flags)
                print(path, "opened")
            except OSError as e:
                print(path, errno.errorcode[e.errno])
        os.close(os.open(mshv_libvirt.__file__, os.O_RDONLY))
        print("package readable")
        import json, email.mime.text  # a lazy import after entering still works
        print("import ok")
        """
    )
    assert res.returncode == 0, res
    assert res.stdout.splitlines() == [
        "/etc/passwd EACCES",
        "/tmp/x-sandbox-probe EACCES",
        "package readable",
        "import ok",
    ]
    assert not os.path.exists("/tmp/x-sandbox-probe")


def test_threads_beyond_the_name_table_still_start() -> None:
    # Every rebuild of a VM starts new vCPU threads; their names must never run out (512 slots).
    res = run(
        """
        import threading
        from mshv_libvirt.vmm import sandbox
        sandbox.enter()
        def vcpu(i):
            sandbox.enter_thread(sandbox.VCPU, f"vcpu{i}")
        for i in range(600):
            t = threading.Thread(target=vcpu, args=(i,))
            t.start()
            t.join()
        print("ok")
        """
    )
    assert res.returncode == 0 and res.stdout == "ok\n", res
