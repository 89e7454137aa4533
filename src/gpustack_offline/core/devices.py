"""GPUStack 2.x devices: read from upstream's runner data, never listed by hand, and what a host of
each runner backend needs (its device tool, version, container runtime, device nodes, run line).

A 2.x version's devices are the non-deprecated backend, backend version and variant triples of its
runner data (`bundles/runners/gpustack-<version>.json`, written by `invoke lock` from the
gpustack-runner wheel the version pins). A device is spelled as the runner image's tag names it:
`<backend><backend version>[-<variant>]`, e.g. `cuda12.9`, `rocm7.0`, `dtk25.04`, `cann8.2-910b`
(`gpustack/runner:cann8.2-910b-vllm0.11.0`), so the spelling turns back into the three fields the
worker filters runners by (`gpustack/worker/backends/base.py:_resolve_image`).

Which version of its backend a worker asks for is the newest not above the host's runtime
version (`gpustack/utils/version.py:pick_runtime_version`; with none detected, the newest). So a
cell's device is its floor (the host must have at least that version) and has a ceiling: the next
backend version with a runner for the cell's services, from which on the worker asks for that one
instead, which the bundle does not carry.

What a host needs per backend is data too: the `[backends.<backend>]` tables of matrix.toml, each
fact with its source (upstream's detector in the pinned gpustack-runtime wheel, its installation
docs, the worker command of its UI).

GPUStack 0.x has no runners: its worker runs llama-box, a build of which it picks at start from
the machine (`gpustack/worker/tools_manager.py:_get_llama_box_platform_name`: the device kind,
the toolkit version, and for Ascend the chip). A 0.x device is one such build, spelled the same
way (`cuda12.8`, `cann8.2.rc1-310p`, `rocm6.2`, `musarc4.2`, `dtk25.04`: upstream's toolkit
version, release candidate included, as the build's asset name carries it), and a version's
devices are the builds of the llama-box release it pins (`[versions.<v>.builds]`). How such a
worker sees a host of the backend, and what differs from 2.x in what the host needs, is the
`"0.x"` table of its `[backends]` entry (`Worker0`); `Toolkit` joins the two for a cell.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpustack_offline.core.errors import CellError

RUNNER_DATA_SCHEMA = 2  # the layout of bundles/runners/gpustack-<version>.json
# An extras name that is no inference service: the images only a Kubernetes install names.
K8S = "k8s"
# How preflight.sh reads a host's version of each backend (a function `version_<name>` there).
VERSION_READERS = ("nvidia-smi", "rocm", "cann", "dtk", "mx-smi", "ixsmi", "ppu-smi", "")

# `cann8.2-910b` (2.x), `cann8.2.rc1-310p`, `musarc4.2`, `rocm6.2` (0.x): the backend, its
# version (release candidates as upstream spells them: `8.2.rc1`, `rc4.2`) and the variant.
_DEVICE = re.compile(
    r"(?P<backend>[a-z]+?)(?P<version>(?:rc)?[0-9]+(?:\.[0-9]+)*(?:\.rc[0-9]+)?)"
    r"(?:-(?P<variant>[a-z0-9]+))?"
)
_SERVICE = re.compile(r"(?P<service>[a-z][a-z_-]*?)(?P<version>[0-9][0-9a-z.]*)?")


def runner_data_path(folder: Path, version: str) -> Path:
    """Where `invoke lock` writes a GPUStack 2.x version's runner data."""
    return folder / f"gpustack-{version.removeprefix('v')}.json"


def version_key(version: str) -> tuple[int, ...]:
    """Numeric parts, for ordering backend versions (`8.2` < `8.10`, `25.04` < `26.04`)."""
    return tuple(int(x) for x in re.findall(r"\d+", version))


@dataclass(frozen=True, order=True)
class Device:
    """A runner backend, backend version and variant, as one axis value."""

    backend: str
    version: str
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.backend}{self.version}{'-' + self.variant if self.variant else ''}"

    @classmethod
    def parse(cls, text: str) -> Device | None:
        match = _DEVICE.fullmatch(text)
        if not match:
            return None
        return cls(match["backend"], match["version"], match["variant"] or "")


def parse_extra_name(name: str) -> tuple[str, str | None]:
    """An extras name of a 2.x cell: `vllm` (the newest service version not deprecated) or
    `vllm0.17.1` (that version, deprecated or not)."""
    match = _SERVICE.fullmatch(name)
    if not match:
        raise CellError(f"extras name {name!r} is not a service such as vllm or vllm0.17.1")
    return match["service"], match["version"]


# --- upstream's runner data ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Runner:
    device: Device
    arch: str
    service: str
    service_version: str
    deprecated: bool


class Offers:
    """What one GPUStack version's runner data offers: devices, their arches and services."""

    def __init__(self, version: str, path: Path, runners: Sequence[_Runner]) -> None:
        self.version = version
        self.path = path
        self._runners = list(runners)
        current = [r for r in self._runners if not r.deprecated]
        self.devices: list[Device] = sorted(
            {r.device for r in current},
            key=lambda d: (d.backend, version_key(d.version), d.variant),
        )
        self._arches: dict[Device, list[str]] = {}
        for r in current:
            arches = self._arches.setdefault(r.device, [])
            if r.arch not in arches:
                arches.append(r.arch)
        for arches in self._arches.values():
            arches.sort()

    @classmethod
    def load(cls, path: Path, version: str) -> Offers:
        fix = f"write it again with `invoke lock` for a GPUStack {version} cell"
        try:
            doc = json.loads(path.read_text())
            if doc["schema"] != RUNNER_DATA_SCHEMA or doc["gpustack"] != version:
                raise ValueError(f"schema {doc['schema']} for GPUStack {doc['gpustack']}")
            runners = [_entry(e) for e in doc["runners"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CellError(f"{path}: not GPUStack {version}'s runner data ({exc}); {fix}") from exc
        return cls(version, path, runners)

    def arches(self, device: Device) -> list[str]:
        return self._arches.get(device, [])

    def services(self, device: Device, arch: str) -> list[str]:
        return sorted(
            {
                r.service
                for r in self._runners
                if r.device == device and r.arch == arch and not r.deprecated
            }
        )

    def candidates(self, device: Device, arch: str, service: str, pin: str | None) -> list[str]:
        """The backend versions (of the device's backend and variant) a worker of `arch` picks
        among for `service`: not deprecated, or with `pin`, that service version deprecated or not
        (`_resolve_image`'s `with_deprecated`). Newest first."""
        found = {
            r.device.version
            for r in self._runners
            if r.device.backend == device.backend
            and r.device.variant == device.variant
            and r.arch == arch
            and r.service == service
            and (r.service_version == pin if pin else not r.deprecated)
        }
        return sorted(found, key=version_key, reverse=True)

    def missing_service(self, device: Device, arch: str, names: Sequence[str]) -> str | None:
        """The first of a cell's extras names with no runner for the device on `arch`, or None."""
        for name in names:
            if name == K8S:
                continue
            service, pin = parse_extra_name(name)
            if device.version not in self.candidates(device, arch, service, pin):
                return name
        return None

    def _per_service(self, device: Device, arch: str, names: Sequence[str]) -> list[list[str]]:
        return [
            self.candidates(device, arch, *parse_extra_name(name)) for name in names if name != K8S
        ]

    def ceiling(self, device: Device, arch: str, names: Sequence[str]) -> str | None:
        """The lowest backend version above the device's from which on a worker picks another
        runner for one of the cell's services; None when the device's is the newest for all."""
        above = [
            v
            for versions in self._per_service(device, arch, names)
            for v in versions
            if version_key(v) > version_key(device.version)
        ]
        return min(above, key=version_key) if above else None

    def newest(self, device: Device, arch: str, names: Sequence[str]) -> str:
        """The backend version a worker that detects none asks for (the newest, per service;
        the newest of those across the cell's services)."""
        found = [versions[0] for versions in self._per_service(device, arch, names) if versions]
        return max(found, key=version_key) if found else device.version


def _entry(e: Mapping[str, Any]) -> _Runner:
    backend, version, variant = e["backend"], e["backend_version"], e["backend_variant"]
    device = Device(backend, version, variant)
    if Device.parse(device.name) != device:
        raise ValueError(
            f"runner {e.get('docker_image')} has backend {backend!r}, version {version!r}, "
            f"variant {variant!r}, which no device name spells back; matrix.py must learn it"
        )
    platform = str(e["platform"])
    if not platform.startswith("linux/"):
        raise ValueError(f"runner {e.get('docker_image')} is for {platform}, not linux/<arch>")
    return _Runner(
        device,
        platform.removeprefix("linux/"),
        str(e["service"]),
        str(e["service_version"]),
        bool(e.get("deprecated", False)),
    )


# --- what a host of a backend needs --------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """The worker's `docker run` options for the backend, for some GPUStack versions (all when
    empty) and backend versions (all when empty)."""

    options: tuple[str, ...]
    gpustack: tuple[str, ...] = ()
    versions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Worker0:
    """How a GPUStack 0.x worker sees a host of the backend and names the llama-box build it
    wants there (`gpustack/utils/platform.py`, `gpustack/worker/tools_manager.py` of 0.6.2 and
    0.7.1): the `"0.x"` table of a `[backends]` entry."""

    device: str  # what gpustack.utils.platform.device() answers on such a host: npu, rocm, dcu …
    llama_box: str  # the toolkit word of its llama-box builds: cann, hip, dtk …
    version_env: str = ""  # the variable the worker reads the toolkit version from ("": fixed)
    variant_env: str = ""  # the variable it reads the chip variant from ("": none)
    named_variants: tuple[str, ...] = ()  # variants a build's name carries (`-310p`)


@dataclass(frozen=True)
class Toolkit:
    """A GPUStack 0.x accelerator device: the llama-box build a worker of the target picks, and
    the answers to the machine questions that make upstream's code pick it."""

    device: Device
    worker: Worker0

    @property
    def build(self) -> str:
        """The toolkit part of the build's asset name: `cann-8.2.rc1-310p`, `hip-6.2`."""
        named = self.device.variant in self.worker.named_variants
        return f"{self.worker.llama_box}-{self.device.version}" + (
            f"-{self.device.variant}" if named else ""
        )

    def env(self) -> dict[str, str]:
        """What the worker reads its toolkit version and chip from (`CUDA_VERSION`,
        `CANN_VERSION`, `CANN_CHIP`), set as the target's would be."""
        out = {}
        if self.worker.version_env:
            out[self.worker.version_env] = self.device.version
        if self.worker.variant_env and self.device.variant:
            out[self.worker.variant_env] = self.device.variant
        return out


@dataclass(frozen=True)
class Vendor:
    """A `[backends.<backend>]` table of matrix.toml: what preflight checks on a host of this
    backend and what the worker's run line adds, each fact with its source."""

    backend: str
    toolkit: str  # how messages name the versioned thing: CUDA, CANN, ROCm, DTK …
    tool: tuple[str, ...]  # the device tool as upstream's docs and UI run it
    version: str  # preflight.sh's reader of the host's version (VERSION_READERS)
    runtime: str  # Docker runtime the worker line names (--runtime), "" if none
    devices: tuple[str, ...]  # device node globs, each must match on the host
    paths: tuple[str, ...]  # host folders the worker line mounts, which must exist
    run: tuple[RunOptions, ...]
    sources: tuple[tuple[str, str], ...] = field(default=())
    # GPUStack 0.x: this table with its "0.x" sub-table applied (None without one), and on that
    # one, how a 0.x worker sees the host
    line0: Vendor | None = field(default=None, compare=False, repr=False)
    worker0: Worker0 | None = None

    def run_options(self, gpustack: str, version: str) -> tuple[str, ...]:
        for entry in self.run:
            if (not entry.gpustack or gpustack in entry.gpustack) and (
                not entry.versions or version in entry.versions
            ):
                return entry.options
        return ()

    def for_image0(self, gpustack: str, version: str) -> Vendor:
        """This 0.x table for a host that runs upstream's image: the device nodes and host
        paths to check are the ones upstream's docker line passes in (`--device`, `-v`), not
        those a pip install loads its toolkit from."""
        nodes, paths = run_needs(self.run_options(gpustack, version))
        return replace(self, devices=nodes, paths=paths)


def run_option(option: str) -> tuple[str, str]:
    """A `docker run` option as upstream's docs write it, as its flag and value: `--device
    /dev/davinci0`, `--device=/dev/kfd`, `-v SRC:DST:ro`, `--ipc=host`."""
    words = shlex.split(option)
    flag, _, value = words[0].partition("=")
    return flag, value or " ".join(words[1:])


def run_needs(options: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The host's device nodes (`--device X`, `--device=X[:Y]`) and files or folders (`-v
    SRC:DST`, `--volume`) that `docker run` options name."""
    nodes, paths = [], []
    for flag, value in map(run_option, options):
        source = value.split(":")[0]
        if flag == "--device":
            nodes.append(source)
        elif flag in ("-v", "--volume") and source.startswith("/"):
            paths.append(source)
    return tuple(nodes), tuple(paths)


_VENDOR_KEYS = {"toolkit", "tool", "version", "runtime", "devices", "paths", "run", "sources"}
LINE0 = "0.x"  # the sub-table of a [backends] entry for GPUStack 0.x
_LINE0_KEYS = {
    "device", "llama-box", "version-env", "variant-env", "named-variants",
    "tool", "version", "runtime", "devices", "paths", "run", "sources",
}  # fmt: skip


def vendors(data: Mapping[str, Any], source: str) -> dict[str, Vendor]:
    """The `[backends]` tables of matrix.toml, checked: a typo is an error, not a fact."""
    out = {}
    for backend, table in data.items():
        where = f"{source}: [backends.{backend}]"
        try:
            unknown = set(table) - _VENDOR_KEYS - {LINE0}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} (known: {sorted(_VENDOR_KEYS)})")
            _reader(table)
            vendor = _vendor(backend, table, _runs(table))
            if LINE0 in table:
                vendor = replace(vendor, line0=_line0(vendor, table, table[LINE0]))
            out[backend] = vendor
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CellError(f"{where} is malformed: {exc!r}") from exc
        line0 = out[backend].line0
        if not out[backend].tool or (line0 is not None and not line0.tool):
            raise CellError(f"{where} names no device tool (tool = [...])")
    return out


def _runs(table: Mapping[str, Any]) -> tuple[RunOptions, ...]:
    return tuple(
        RunOptions(
            tuple(_strings(r["options"])),
            tuple(_strings(r.get("gpustack", []))),
            tuple(_strings(r.get("versions", []))),
        )
        for r in table.get("run", [])
    )


def _reader(table: Mapping[str, Any]) -> str:
    reader = table.get("version", "")
    if reader not in VERSION_READERS:
        raise ValueError(f"version {reader!r} is none of {VERSION_READERS}")
    return str(reader)


def _vendor(backend: str, table: Mapping[str, Any], runs: tuple[RunOptions, ...]) -> Vendor:
    return Vendor(
        backend=backend,
        toolkit=str(table["toolkit"]),
        tool=tuple(_strings(table["tool"])),
        version=_reader(table),
        runtime=str(table.get("runtime", "")),
        devices=tuple(_strings(table.get("devices", []))),
        paths=tuple(_strings(table.get("paths", []))),
        run=runs,
        sources=tuple(sorted((str(k), str(v)) for k, v in table["sources"].items())),
    )


def _line0(vendor: Vendor, table: Mapping[str, Any], sub: Mapping[str, Any]) -> Vendor:
    """The backend's table for GPUStack 0.x: its "0.x" keys over the 2.x ones; its run options
    are its own (upstream's 0.x docker line for the image), never the 2.x worker's."""
    unknown = set(sub) - _LINE0_KEYS
    if unknown:
        known = sorted(_LINE0_KEYS)
        raise ValueError(f"[{LINE0}] has unknown keys {sorted(unknown)} (known: {known})")
    merged = {**{k: v for k, v in table.items() if k != LINE0}, **sub}
    merged["sources"] = {**table["sources"], **sub.get("sources", {})}
    worker = Worker0(
        device=str(sub["device"]),
        llama_box=str(sub["llama-box"]),
        version_env=str(sub.get("version-env", "")),
        variant_env=str(sub.get("variant-env", "")),
        named_variants=tuple(_strings(sub.get("named-variants", []))),
    )
    return replace(_vendor(vendor.backend, merged, _runs(sub)), worker0=worker)


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, not {value!r}")
    return value
