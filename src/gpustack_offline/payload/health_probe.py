"""Exit 0 if GPUStack answers /healthz with 200 on 127.0.0.1:PORT, else 1.

Run in the target container by its python3 (standard library only, Python 3.8 and later):

    python3 -c "$(cat health_probe.py)" PORT
"""

import sys
import urllib.request


def main() -> int:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=5)
        return 0 if r.status == 200 else 1
    except Exception:
        return 1


if __name__ == "__main__":
    sys.exit(main())
