"""What an operator does first: log in to the UI as admin, which asks /update/ and the catalog.

Run in the target container by its python3 (standard library only, Python 3.8 and later):

    python3 -c "$(cat ui_visit.py)" BASE_URL PASSWORD_FILE [PATH...]

The PATHs asked after the login are GPUStack 0.x's UI's first ones unless given (2.x serves its
API under /v2). Prints each path with its HTTP status, or `failed:` and why; it always exits 0.
"""

import http.cookiejar
import sys
import urllib.parse
import urllib.request

PAGES = (
    ("/", None),
    ("/update/", None),
    ("/v1/model-sets?page=1&perPage=10", None),
)


def main() -> None:
    base = sys.argv[1]
    with open(sys.argv[2]) as fh:
        password = fh.read().strip()
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": "admin", "password": password}).encode()
    pages = [(path, None) for path in sys.argv[3:]] or PAGES
    for path, data in (("/auth/login", form), *pages):
        try:
            print(path, opener.open(base + path, data=data, timeout=30).status)
        except Exception as exc:
            print(path, "failed:", exc)


if __name__ == "__main__":
    main()
