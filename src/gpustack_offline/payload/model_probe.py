"""A model of the site's catalog deployed through GPUStack's API, as an operator does in the UI.

Run in the target container by its python3 (standard library only, Python 3.8 and later):

    python3 -c "$(cat model_probe.py)" BASE_URL PASSWORD_FILE MODEL_NAME SECONDS [API [worker]]

Logs in as admin (the password in PASSWORD_FILE), finds MODEL_NAME in the model catalog
(`GET API/model-sets?search=`, then its specs: `GET API/model-sets/{id}/specs`; API is `/v1`,
GPUStack 0.6 and 0.7, the default, or `/v2`, GPUStack 2.x's `versioned_prefix`), deploys its
`local_path` spec (`POST API/models`: the spec's source, path, backend and replicas under the
set's name and categories, as the UI's catalog page sends them; for 2.x also a cluster: the
first of `GET API/clusters`, or, on a fresh server-only 2.x that has none, one made as the
operator's "Add Cluster" does, `POST API/clusters` with provider Docker; with `worker`, first
waits until `GET API/workers` lists one `ready`, as an operator deploys once the worker is up,
and takes its cluster), then follows the
model's instance (`GET API/models/{id}/instances`) for at most SECONDS until it runs or fails
(at most a minute after the worker resolved its file), or until the scheduler left it `pending`
with its reason (no worker fits; a fresh instance is `pending` with none, and `analyzing` may
pass between two polls), and asks `GET API/model-files`. Prints one JSON line: what each
answered (`catalog`, `spec`, `created`, the instance states seen in order, the last instance,
the model files), or `error`. Exits 0 when every request got an answer; judging them is the
caller's.
"""

import http.cookiejar
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# The states an instance passes before its engine runs (ModelInstanceStateEnum, 0.7 and 2.x).
BEFORE_SERVING = ("pending", "analyzing", "scheduled", "initializing", "downloading")
ENDED = ("running", "error")
ENGINE_SECONDS = 60  # from `starting`, how long the engine gets to run or fail
CLUSTER = "site"  # the cluster made on a 2.x server that has none


def main() -> int:
    base, password_file, name, seconds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    api = sys.argv[5] if len(sys.argv) > 5 else "/v1"
    wait_worker = len(sys.argv) > 6 and sys.argv[6] == "worker"
    with open(password_file) as fh:
        password = fh.read().strip()
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def call(path, data=None, form=False):
        headers = {}
        body = None
        if data is not None and form:
            body = urllib.parse.urlencode(data).encode()
        elif data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(base + path, data=body, headers=headers)
        try:
            with opener.open(request, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:  # an answer all the same: keep its status
            status, text = exc.code, exc.read().decode()
        return status, json.loads(text) if text.startswith(("{", "[")) else text

    out = {}
    try:
        out["login"], _ = call("/auth/login", {"username": "admin", "password": password}, True)
        query = urllib.parse.urlencode({"search": name, "page": 1, "perPage": 100})
        _, sets = call(f"{api}/model-sets?{query}")
        found = [s for s in sets["items"] if s.get("name") == name]
        out["catalog"] = found
        if not found:
            raise LookupError(f"no model set named {name!r} in the catalog")
        _, specs = call(f"{api}/model-sets/{found[0]['id']}/specs?page=1&perPage=100")
        local = [s for s in specs["items"] if s.get("source") == "local_path"]
        out["spec"] = local[0] if local else None
        if not local:
            raise LookupError(f"{name!r} has no local_path spec: {specs['items']}")
        spec = local[0]
        model = {
            "name": name,
            "source": "local_path",
            "local_path": spec["local_path"],
            "backend": spec.get("backend"),
            "backend_version": spec.get("backend_version"),
            "backend_parameters": spec.get("backend_parameters") or [],
            "replicas": spec.get("replicas") or 1,
            "categories": found[0].get("categories") or [],
            "description": found[0].get("description"),
        }
        deadline = time.monotonic() + float(seconds)
        worker = None
        while wait_worker and worker is None:
            _, workers = call(f"{api}/workers?page=1&perPage=100")
            listed = workers.get("items") or [] if isinstance(workers, dict) else []
            out["workers"] = [
                {
                    "name": w.get("name"),
                    "state": w.get("state"),
                    "cluster_id": w.get("cluster_id"),
                    "gpus": len((w.get("status") or {}).get("gpu_devices") or []),
                }
                for w in listed
            ]
            worker = next((w for w in listed if w.get("state") == "ready"), None)
            if worker is None and time.monotonic() > deadline:
                raise RuntimeError(f"no worker became ready in {seconds} s: {out['workers']}")
            if worker is None:
                time.sleep(1)
        if api != "/v1":  # 2.x: a model is deployed to a cluster
            _, clusters = call(f"{api}/clusters?page=1&perPage=100")
            items = clusters.get("items") or []
            if worker is not None:  # the worker's own cluster
                items = [c for c in items if c.get("id") == worker.get("cluster_id")] or items
            if not items:  # a fresh server has none: the operator adds one (Docker) first
                status, made = call(f"{api}/clusters", {"name": CLUSTER, "provider": "Docker"})
                out["cluster_created"] = status
                items = [made] if status == 200 else []
            out["clusters"] = [c.get("name") for c in items]
            model["cluster_id"] = items[0]["id"]
        status, created = call(f"{api}/models", model)
        out["created"] = {"status": status, "body": created}
        if status != 200:
            raise RuntimeError(f"POST {api}/models answered {status}")
        states: list = []
        instance = None
        while time.monotonic() < deadline:
            _, instances = call(f"{api}/models/{created['id']}/instances?page=1&perPage=10")
            items = instances.get("items") or []
            if items:
                instance = items[0]
                state = instance.get("state")
                if not states or states[-1] != state:
                    states.append(state)
                if state in ENDED:
                    break
                if state == "pending" and instance.get("state_message"):
                    break  # the scheduler's answer: no worker fits (or none is there)
                if instance.get("resolved_path") and state not in BEFORE_SERVING:
                    # the file is resolved: give the engine a little longer to say how it went
                    deadline = min(deadline, time.monotonic() + ENGINE_SECONDS)
            time.sleep(1)
        out["states"] = states
        out["instance"] = instance
        _, files = call(f"{api}/model-files?page=1&perPage=100")
        out["model_files"] = files.get("items") if isinstance(files, dict) else files
    except Exception as exc:  # one line for the report, whatever failed
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out, sort_keys=True))
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
