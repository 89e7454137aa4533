"""Where a model comes from: one module per `source` of `bundles/models.toml`, chosen once here.

Each module meets `ModelSource` (as cibuildwheel's platform modules meet theirs): the endpoint
and the option and variables that move it, where a file lives at a commit, the public pages,
`resolve` (the revision as a commit and every file's size and sha256, for the lock) and `fetch`
(the locked files into the blob store through `core/downloads.py`). Nothing else branches on the
source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import ModelError
from gpustack_offline.core.models import SOURCES, Model
from gpustack_offline.stages import hub, modelscope
from gpustack_offline.stages.model_locks import ModelLock, Resolved


class ModelSource(Protocol):
    # read-only members (properties), as a module's constants meet them
    @property
    def DEFAULT_ENDPOINT(self) -> str: ...  # noqa: N802 - the module's constant

    @property
    def OPTION(self) -> str: ...  # noqa: N802 - the Options field naming its endpoint

    @property
    def LOCK_NOTE(self) -> Sequence[str]: ...  # noqa: N802 - where a lock's sums came from

    def endpoint(self, option: str, env: Mapping[str, str] | None = None) -> str: ...

    def file_url(self, base: str, repository: str, commit: str, path: str) -> str: ...

    def home(self, repository: str) -> str: ...

    def web_url(self, repository: str, commit: str) -> str: ...

    def resolve(
        self, model: Model, base: str, store: BlobStore, previous: ModelLock | None = None
    ) -> Resolved: ...

    def fetch(
        self, store: BlobStore, lock: ModelLock, base: str, jobs: int = 4, show: bool = True
    ) -> dict[str, Path]: ...


MODEL_SOURCES: Mapping[str, ModelSource] = {"huggingface": hub, "modelscope": modelscope}
assert set(MODEL_SOURCES) == set(SOURCES), "every source of models.toml has its module"


def for_source(source: str) -> ModelSource:
    try:
        return MODEL_SOURCES[source]
    except KeyError:
        raise ModelError(
            f"model source {source!r} is not one of {', '.join(sorted(MODEL_SOURCES))}"
        ) from None
