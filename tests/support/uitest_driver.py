"""The AT-SPI side of tests/support/uitest.py: runs under Debian's /usr/bin/python3 (dogtail, pyatspi), never
in the test venv, and imports nothing from the project. It answers JSON-line requests on stdin, one reply
line each on stdout:

``{"op": "find", "app": "virt-manager", "path": [{"role": "frame", "name": "..."}, ...], "timeout": 30}``
answers the last node (role, name, showing, sensitive, checked, text); ``click`` clicks it (its action,
like upstream's uitests, or the pointer), ``texts`` lists every descendant's (role, name, text), ``keys``
presses keys and types into it, ``settext`` replaces an entry's text, ``exists`` looks once and answers
the node or null. A click may pass ``"reply": false`` when its handler keeps the application busy (a window
built, a modal dialog run). A step may also ask for the node's accessible ``text``; a name or text
given as ``{"re": "..."}`` is a regular expression, ``{"contains": "..."}`` a substring.
"""

# mypy: ignore-errors
# (dogtail and pyatspi have no type information; this file is checked by running it)

from __future__ import annotations

import json
import re
import sys
import time

from dogtail.config import config

config.logDebugToFile = False
config.logDebugToStdOut = False
config.searchShowingOnly = False
config.actionDelay = 0.2
config.searchCutoffCount = 1
config.defaultDelay = 0.05
config.checkForA11y = False  # the harness started the bus itself; there is no dconf

from dogtail import rawinput, tree  # noqa: E402


class Failed(Exception):
    pass


def _name_ok(want, name):
    if want is None:
        return True
    if isinstance(want, dict):
        if "re" in want:
            return re.fullmatch(want["re"], name or "") is not None
        return want["contains"] in (name or "")
    return name == want


def _matches(node, step):
    try:
        if "role" in step and node.roleName != step["role"]:
            return False
        if step.get("showing") and not node.showing:
            return False
        if "text" in step and not _name_ok(step["text"], _text(node)):
            return False
        return _name_ok(step.get("name"), node.name)
    except Exception:  # a node that went away while we looked at it
        return False


def _find_once(app_name, path):
    apps = [a for a in tree.root.applications() if a.name == app_name]
    if not apps:
        return None
    node = apps[-1]
    for step in path:
        if "index" in step:  # the n-th match in tree order, for nodes that have no name of their own
            matches = node.findChildren(lambda n, step=step: _matches(n, step), showingOnly=False)
            found = matches[step["index"]] if len(matches) > step["index"] else None
        else:
            found = node.findChild(lambda n, step=step: _matches(n, step), retry=False, requireResult=False)
        if found is None:
            return None
        node = found
    return node


def find(req):
    deadline = time.monotonic() + req.get("timeout", 30)
    while True:
        try:
            node = _find_once(req["app"], req["path"])
        except Exception as err:  # the application is busy past AT-SPI's own 25 s call timeout: look again
            if "timeout from dbind" not in str(err):
                raise
            node = None
        if node is not None and (not req.get("sensitive") or node.sensitive):
            return node
        if time.monotonic() > deadline:
            windows = [w.name for a in tree.root.applications() if a.name == req["app"] for w in a.children]
            raise Failed(f"not found within {req.get('timeout', 30)} s: {req['path']} in {req['app']} {windows}")
        time.sleep(0.2)


def _text(node):
    try:
        return node.text
    except Exception:
        return None


def describe(node):
    return {
        "role": node.roleName,
        "name": node.name,
        "showing": bool(node.showing),
        "sensitive": bool(node.sensitive),
        "checked": bool(node.checked) if node.roleName in ("check box", "radio button", "toggle button") else None,
        "text": _text(node),
    }


def handle(req):
    op = req["op"]
    if op == "apps":
        return [a.name for a in tree.root.applications()]
    if op == "exists":  # one look, no waiting: the node now, or None
        try:
            found = _find_once(req["app"], req["path"])
            return describe(found) if found is not None else None
        except Exception as err:
            if "timeout from dbind" in str(err) or "does not exist" in str(err):
                return None
            raise
    node = find(req)
    if op == "find":
        return describe(node)
    if op == "click":
        if req.get("mouse"):
            node.click()  # a real pointer click at the node's centre (XTest), e.g. to select a row
        else:
            node.doActionNamed(req.get("action", "click"))
        # A click whose handler runs long (builds a window, or runs a modal dialog) leaves the application
        # unable to answer for a while: with reply=False nothing more is asked of it.
        return describe(node) if req.get("reply", True) else {}
    if op == "texts":
        out = []
        for n in node.findChildren(lambda _n: True, showingOnly=False):
            try:
                out.append({"role": n.roleName, "name": n.name, "text": _text(n), "showing": bool(n.showing)})
            except Exception:
                pass
        return out
    if op == "settext":  # replace an entry's text through AT-SPI's EditableText (no keystroke can be lost)
        node.text = req["text"]
        return describe(node)
    if op == "keys":  # focus the node, press named keys (X keysyms: "End", "Return"), then type text
        node.grabFocus()
        for key in req.get("press", []):
            rawinput.pressKey(key)
        if req.get("text"):
            rawinput.typeText(req["text"])
        return describe(node)
    if op == "combo":  # pick an entry of a combo box by name, as its own menu would
        node.findChild(lambda n: n.roleName == "menu item" and n.name == req["item"], retry=False).doActionNamed(
            "click"
        )
        return describe(node)
    raise Failed(f"unknown op {op!r}")


def main():
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"ok": True, "result": handle(req)}
        except Exception as err:
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
