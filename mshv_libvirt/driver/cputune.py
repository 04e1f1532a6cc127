"""CPU pinning (``<cputune>``): the domain XML edits, and their application to a running VMM's threads.

As libvirt's QEMU driver does, every thread is given an explicit affinity when the domain starts: a
pinned vCPU its vcpupin set, the VMM's other threads (its "emulator") the emulatorpin set, and anything
unpinned every online host CPU (so a VMM does not inherit a restricted daemon's affinity). That last,
best-effort kind may fail quietly; a pin the user asked for may not.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

from lxml import etree

from mshv_libvirt.domain import Cputune
from mshv_libvirt.domain.xml import format_cpuset
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError
from mshv_libvirt.proc import read_cpu_list, task_stat, thread_ids

log = logging.getLogger(__name__)


def vcpu_threads(status: Mapping[str, Any]) -> dict[int, int]:
    """vCPU index -> thread id from a VMM ``status`` reply (only vCPUs whose thread runs)."""
    raw = status.get("vcpu_tids")
    if not isinstance(raw, dict):
        return {}
    out: dict[int, int] = {}
    for index, tid in raw.items():
        if str(index).isdigit() and isinstance(tid, int) and tid > 0:
            out[int(index)] = tid
    return out


def set_affinity(tid: int, cpus: Collection[int], *, quiet: bool = False) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as err:
        if quiet or err.errno == errno.ESRCH:  # (a thread that has ended needs no pin)
            log.debug("cannot set the CPU affinity of thread %d: %s", tid, err)
            return
        # libvirt's virProcessSetAffinity message
        raise VirtError(
            ErrorCode.SYSTEM_ERROR, f"cannot set CPU affinity on process {tid}: {err.strerror}", ErrorDomain.NONE
        ) from err


def apply(pid: int, vcpus: Mapping[int, int], tune: Cputune) -> None:
    """Pin the threads of VMM ``pid``: ``vcpus`` (index -> tid) per vcpupin, all others per emulatorpin."""
    try:
        host = read_cpu_list("online")
    except (OSError, ValueError):
        host = frozenset(os.sched_getaffinity(0))
    for index, tid in sorted(vcpus.items()):
        pin = tune.vcpu(index)
        set_affinity(tid, pin if pin is not None else host, quiet=pin is None)
    vcpu_tids = set(vcpus.values())
    for tid in thread_ids(pid):
        st = task_stat(pid, tid)
        if tid in vcpu_tids or st is None or not st.pinnable:  # (kernel workers may not be pinned)
            continue
        pin = tune.emulatorpin
        set_affinity(tid, pin if pin is not None else host, quiet=pin is None)


def _cputune_element(root: etree._Element) -> etree._Element:
    """The <cputune> element, created where libvirt puts it (right after <vcpu>)."""
    el = root.find("cputune")
    if el is None:
        el = etree.Element("cputune")
        vcpu = root.find("vcpu")
        if vcpu is not None:
            vcpu.addnext(el)
        else:
            root.append(el)
    return el


def _drop_if_empty(root: etree._Element, el: etree._Element) -> None:
    if len(el) == 0:
        root.remove(el)


def set_vcpupin(vcpu: int, cpus: Collection[int]) -> Callable[[etree._Element], None]:
    """An XmlEdit: <vcpupin vcpu= cpuset=> for one vCPU (replacing its previous pin)."""

    def edit(root: etree._Element) -> None:
        el = _cputune_element(root)
        for old in el.findall("vcpupin"):
            if old.get("vcpu") == str(vcpu):  # (edits work on the canonical XML)
                el.remove(old)
        pin = etree.Element("vcpupin", vcpu=str(vcpu), cpuset=format_cpuset(cpus))
        el.insert(0, pin)  # (the canonical form sorts the pins again)
        _drop_if_empty(root, el)

    return edit


def set_emulatorpin(cpus: Collection[int]) -> Callable[[etree._Element], None]:
    """An XmlEdit: the <emulatorpin cpuset=>."""

    def edit(root: etree._Element) -> None:
        el = _cputune_element(root)
        for old in el.findall("emulatorpin"):
            el.remove(old)
        etree.SubElement(el, "emulatorpin", cpuset=format_cpuset(cpus))

    return edit
