"""State an operator makes through GPUStack's API, made and read back across an upgrade.

Run in the target container by its python3 (standard library only, Python 3.8 and later):

    python3 -c "$(cat state_probe.py)" BASE_URL PASSWORD [NEW_PASSWORD] [KEY_NAME]

Logs in as admin with PASSWORD (or, when PASSWORD names a file, the password in it); with
NEW_PASSWORD changes the admin password (`POST /auth/update-password`, GPUStack 0.6 and 0.7);
with KEY_NAME creates an API key of that name (`POST /v1/api-keys`). Prints one JSON line:
the login status and the names of the admin's API keys afterwards (`GET /v1/api-keys`), or
`error`. Exits 0 only when every request succeeded.
"""

import http.cookiejar
import json
import os
import sys
import urllib.parse
import urllib.request


def main() -> int:
    base, password = sys.argv[1], sys.argv[2]
    if os.path.isfile(password):
        with open(password) as fh:
            password = fh.read().strip()
    new_password = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    key = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def call(path, data=None, form=False):
        if data is not None and not form:
            body = json.dumps(data).encode()
            headers = {"Content-Type": "application/json"}
        else:
            body = urllib.parse.urlencode(data).encode() if data is not None else None
            headers = {}
        request = urllib.request.Request(base + path, data=body, headers=headers)
        with opener.open(request, timeout=30) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if text.startswith(("{", "[")) else text

    out = {}
    try:
        out["login"], _ = call("/auth/login", {"username": "admin", "password": password}, True)
        if new_password:
            out["update-password"], _ = call(
                "/auth/update-password",
                {"current_password": password, "new_password": new_password},
            )
        if key:
            out["create-key"], _ = call("/v1/api-keys", {"name": key})
        _, keys = call("/v1/api-keys?page=1&perPage=100")
        out["keys"] = sorted(k["name"] for k in keys["items"])
    except Exception as exc:  # one line for the report, whatever failed
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out, sort_keys=True))
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
