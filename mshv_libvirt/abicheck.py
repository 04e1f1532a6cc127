"""ABI manifest: record every ioctl number, struct size and field layout, and refuse changes.

    python -m mshv_libvirt.abicheck --write abi/manifest.json   # after *adding* something
    python -m mshv_libvirt.abicheck --check abi/manifest.json   # CI: fails on any change

The numbers come from the compiled module, i.e. from the C compiler reading abi/include/.
"You can not break userspace": a recorded ioctl may not disappear or change value, a recorded
struct may not change size, and a recorded field may not move, shrink, grow or vanish. Adding
new ioctls, structs, fields or constants is fine and is reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

Manifest = dict[str, Any]


def _ffi_and_lib() -> tuple[Any, Any]:
    from mshv_libvirt._mshv import ffi, lib

    return ffi, lib


def build_manifest() -> Manifest:
    """The ABI as the compiled module sees it."""
    from mshv_libvirt.hv import ioctls

    ffi, lib = _ffi_and_lib()
    structs: dict[str, Any] = {}
    _, struct_tags, union_tags = ffi.list_types()
    tagged = [("struct", t) for t in struct_tags] + [("union", t) for t in union_tags]
    for kind, name in sorted(tagged, key=lambda kt: kt[1]):
        ctype = ffi.typeof(f"{kind} {name}")
        fields = {
            fname: {"offset": int(field.offset), "size": int(ffi.sizeof(field.type)), "type": field.type.cname}
            for fname, field in ctype.fields or []
        }
        structs[f"{kind} {name}"] = {"size": int(ffi.sizeof(ctype)), "fields": fields}
    constants = {
        name: int(getattr(lib, name))
        for name in sorted(dir(lib))
        if name.isupper() and isinstance(getattr(lib, name), int)
    }
    return {
        "ioctls": {name: value for name, value in sorted(ioctls.NAMES.items())},
        "structs": structs,
        "constants": constants,
    }


def compare(recorded: Manifest, current: Manifest) -> tuple[list[str], list[str]]:
    """(breaking changes, additions) going from ``recorded`` to ``current``."""
    broken: list[str] = []
    added: list[str] = []
    for name, value in recorded.get("ioctls", {}).items():
        if name not in current["ioctls"]:
            broken.append(f"ioctl {name} disappeared")
        elif current["ioctls"][name] != value:
            broken.append(f"ioctl {name} changed from {value:#x} to {current['ioctls'][name]:#x}")
    added += [f"ioctl {n}" for n in current["ioctls"] if n not in recorded.get("ioctls", {})]

    for sname, rec in recorded.get("structs", {}).items():
        cur = current["structs"].get(sname)
        if cur is None:
            broken.append(f"{sname} disappeared")
            continue
        if cur["size"] != rec["size"]:
            broken.append(f"{sname} size changed from {rec['size']} to {cur['size']}")
        for fname, f in rec["fields"].items():
            cf = cur["fields"].get(fname)
            if cf is None:
                broken.append(f"{sname}.{fname} disappeared")
            elif (cf["offset"], cf["size"]) != (f["offset"], f["size"]):
                broken.append(
                    f"{sname}.{fname} moved from offset {f['offset']}/size {f['size']} "
                    f"to offset {cf['offset']}/size {cf['size']}"
                )
        added += [f"{sname}.{fn}" for fn in cur["fields"] if fn not in rec["fields"]]
    added += [s for s in current["structs"] if s not in recorded.get("structs", {})]

    for cname, value in recorded.get("constants", {}).items():
        if cname not in current["constants"]:
            broken.append(f"constant {cname} disappeared")
        elif current["constants"][cname] != value:
            broken.append(f"constant {cname} changed from {value:#x} to {current['constants'][cname]:#x}")
    added += [f"constant {c}" for c in current["constants"] if c not in recorded.get("constants", {})]
    return broken, added


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, metavar="MANIFEST")
    group.add_argument("--check", type=Path, metavar="MANIFEST")
    args = ap.parse_args(argv)
    current = build_manifest()
    if args.write:
        args.write.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}: {len(current['ioctls'])} ioctls, {len(current['structs'])} structs")
        return 0
    recorded = json.loads(args.check.read_text())
    broken, added = compare(recorded, current)
    for item in added:
        print(f"added: {item}")
    for item in broken:
        print(f"ABI BREAK: {item}", file=sys.stderr)
    if broken:
        print(f"{len(broken)} recorded layout(s) changed: the ABI must only grow", file=sys.stderr)
        return 1
    print(f"ABI ok: {len(recorded['ioctls'])} ioctls and {len(recorded['structs'])} structs unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
