"""GPUStack 2.x images, in two rooms: upstream's data (`runner_data`: the three wheels read into
`bundles/runners/gpustack-<version>.json`, and read back) and the worker's choice from it
(`runner_choice`: which runner, pause, health and server images a worker asks for, and under
which registry). This module only gathers both under the one name callers use."""

from gpustack_offline.stages.errors import NoRunnerError, RunnerDataError
from gpustack_offline.stages.runner_choice import (
    ImageRef,
    Offer,
    Selection,
    apply_registry_override,
    available,
    backend_version_for_host,
    cell_selection,
    describe,
    nearest,
    parse_service,
    select,
    worker_references,
)
from gpustack_offline.stages.runner_data import (
    ExtraImage,
    Package,
    Runner,
    RunnerData,
    data_path,
    extract,
    load,
    refresh,
    render,
    version_sort_key,
)

__all__ = [
    "ExtraImage",
    "ImageRef",
    "NoRunnerError",
    "Offer",
    "Package",
    "Runner",
    "RunnerData",
    "RunnerDataError",
    "Selection",
    "apply_registry_override",
    "available",
    "backend_version_for_host",
    "cell_selection",
    "data_path",
    "describe",
    "extract",
    "load",
    "nearest",
    "parse_service",
    "refresh",
    "render",
    "select",
    "version_sort_key",
    "worker_references",
]
