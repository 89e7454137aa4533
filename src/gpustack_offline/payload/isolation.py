"""The verification container is isolated: names resolve only to the sinkhole, and a public
address does not answer.

Docker's --internal network drops forwarding out of the bridge (a default route still shows).
The sinkhole answers every name with its own address, so isolation is checked on addresses:
pypi.org must resolve to the sinkhole only, and a public address must not answer.

Run in the target container by its python3 (standard library only, Python 3.8 and later):

    python3 -c "$(cat isolation.py)" SINKHOLE_ADDRESS
"""

import socket
import sys


def main() -> None:
    names = {a[4][0] for a in socket.getaddrinfo("pypi.org", 443, socket.AF_INET)}
    if names != {sys.argv[1]}:
        sys.exit(f"pypi.org resolves to {names}, not only to the sinkhole {sys.argv[1]}")
    try:
        socket.create_connection(("1.1.1.1", 443), timeout=3).close()
    except OSError:
        sys.exit(0)
    sys.exit("1.1.1.1:443 answered: the container is not isolated")


if __name__ == "__main__":
    main()
