"""Which process asked for which outside name: a Python audit hook for verification containers.

Verification puts this folder on PYTHONPATH for `gpustack start` only, so Python imports it at
start-up as `sitecustomize` in the server and in every worker process it spawns. It changes
nothing; it appends one JSON line per outside name looked up (`socket.getaddrinfo`) and per
connection to a public address (`socket.connect`) to $GPUSTACK_EGRESS_AUDIT_LOG, with the
process title, pid and the innermost gpustack frame, so a failed egress check can name the
process and the code. The sinkhole is the network's record; this only attributes it.
"""

import ipaddress
import json
import os
import sys
import time
import traceback

_LOG = os.environ.get("GPUSTACK_EGRESS_AUDIT_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _outside_name(host):
    if not isinstance(host, str) or not host or host.lower() in _LOCAL_NAMES:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _public_address(address):
    if not isinstance(address, tuple) or not address:
        return False
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return _outside_name(address[0])
    return ip.is_global


def _installed(filename):
    """The path below site-packages (a venv, pip) or dist-packages (Debian's Python), or None."""
    for folder in ("site-packages/", "dist-packages/"):
        if folder in filename:
            return filename.split(folder)[-1]
    return None


def _where():
    frames = traceback.extract_stack()[:-3]
    ours = [f for f in frames if "gpustack" in f.filename and _installed(f.filename)]
    frame = (ours or frames or [None])[-1]
    if not frame:
        return ""
    return f"{_installed(frame.filename) or frame.filename}:{frame.lineno}"


def _process():
    try:
        with open("/proc/self/comm") as fh:
            comm = fh.read().strip()
    except OSError:
        comm = ""
    return comm or os.path.basename(sys.argv[0] if sys.argv else "python")


def _hook(event, args):
    if event == "socket.getaddrinfo" and _outside_name(args[0]):
        host = args[0]
    elif event == "socket.connect" and _public_address(args[1]):
        host = str(args[1][0])
    else:
        return
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "event": event.split(".")[1],
        "host": host.lower(),
        "pid": os.getpid(),
        "process": _process(),
        "where": _where(),
    }
    try:
        with open(_LOG, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError:
        pass


if _LOG:
    sys.addaudithook(_hook)
