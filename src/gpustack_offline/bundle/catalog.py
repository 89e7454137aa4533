"""GPUStack model catalog entries for a model bundle: what the site's `install-model.sh` merges
into the catalog file the server reads (`--model-catalog-file`), with a `local_path` source.

Upstream's format differs by release line (`docs/user-guide/model-catalog.md`,
`gpustack/schemas/model_sets.py`): 0.x reads a YAML list of model sets, each with `templates`;
2.x reads a mapping with `model_sets` (each with `specs`) and `draft_models`, and spells the
backends differently (`vLLM`, `SGLang`; it has no llama-box). The bundle carries one entry per
line whose GPUStack has the model's backend, as YAML text with `LOCAL_PATH` where the site's
path goes (the installer knows it, the build does not). Strings are written as JSON strings,
which are YAML double-quoted scalars, so no YAML library is needed here or on the site.
"""

from __future__ import annotations

import json

from gpustack_offline.core.models import BACKENDS, Model
from gpustack_offline.stages.model_locks import ModelLock
from gpustack_offline.stages.model_sources import for_source

LOCAL_PATH = "@LOCAL_PATH@"  # replaced by install-model.sh with the placed file or folder
SERIES = ("0", "2")


def fragment_path(series: str) -> str:
    return f"catalog/gpustack-{series}.x.yaml"


def backend_for(model: Model, series: str) -> str | None:
    """The model's backend as GPUStack `series` spells it; None where that line has none."""
    return BACKENDS[model.backend][series]


def default_series(model: Model) -> str:
    """The catalog format an installer writes when neither the site's catalog nor its
    `--gpustack` says: the newest line that has the backend."""
    return max(s for s in SERIES if backend_for(model, s) is not None)


def _q(value: str) -> str:
    return json.dumps(value)


def entry(model: Model, lock: ModelLock, series: str) -> str:
    """The model set for GPUStack `series` (a YAML sequence item at column 0)."""
    backend = backend_for(model, series)
    if backend is None:
        raise ValueError(f"GPUStack {series}.x has no {model.backend} backend")
    description = model.description or (
        f"{model.repository} at commit {lock.commit[:12]}, carried offline by gpustack-offline"
    )
    lines = [
        f"- name: {_q(model.name)}",
        f"  description: {_q(description)}",
        f"  home: {_q(for_source(model.source).home(model.repository))}",
        "  categories:",
        *(f"    - {_q(c)}" for c in model.categories),
        "  templates:" if series == "0" else "  specs:",
        *(["    - mode: standard", "      source: local_path"] if series == "2" else
          ["    - source: local_path"]),
        f'      local_path: "{LOCAL_PATH}"',
        f"      backend: {_q(backend)}",
        "      replicas: 1",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def fragments(model: Model, lock: ModelLock) -> dict[str, str]:
    """Bundle path -> catalog entry text, one per GPUStack line that has the backend."""
    return {
        fragment_path(s): entry(model, lock, s) for s in SERIES if backend_for(model, s) is not None
    }
