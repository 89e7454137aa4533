"""The build matrix: cells, their ids, the rules that refuse impossible ones, and selection.

The data lives in `bundles/matrix.toml`; this module only reads it. A cell id names every axis
(`v0.7.1-linux-arm64-cpu-py3.11-base-pip`), so one glob selects cells the way cibuildwheel's
build identifiers do, and axis flags narrow a selection without knowing the id format.

The devices of a GPUStack 2.x version (`devices = "runners"` in its [versions] table) are not in
matrix.toml: they are read from upstream's runner data for that version (`core.devices`), and so
are the arches and services each one exists for; those limits refuse cells like rules do, with
a reason that names the runner data file.

The devices of a GPUStack 0.x version are the builds of the llama-box release its worker runs
(`[versions.X.builds]`, each with the platforms llama-box builds it for), and its images are the
tags upstream publishes per device (`[versions.X.images]`); a device, platform or image missing
from them is refused with the same kind of reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpustack_offline.core.devices import (
    Device,
    Offers,
    Toolkit,
    Vendor,
    runner_data_path,
    vendors,
)
from gpustack_offline.core.errors import CellError
from gpustack_offline.core.tomlfile import read_toml_text

AXES = ("version", "os", "arch", "device", "python", "extras", "method")
_ID_RE = re.compile(
    r"^v(?P<version>[0-9][0-9a-z.]*)-(?P<os>[a-z]+)-(?P<arch>[a-z0-9]+)"
    r"-(?P<device>[a-z0-9.]+(?:-[a-z0-9]+)?)"
    r"-py(?P<python>[0-9]+\.[0-9]+)-(?P<extras>[a-z0-9.+]+)-(?P<method>[a-z]+)$"
)
_ARCH_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
SCHEMA = 1  # the layout of matrix.toml this module reads
RUNNERS = "runners"  # [versions.X] devices = "runners": the devices come from the runner data


@dataclass(frozen=True)
class Image0:
    """Upstream's image of a GPUStack 0.x device: its tag's suffix (`-npu-310p`; "" for the plain
    tag) and the platforms it is published for."""

    tag: str
    platforms: tuple[str, ...]


@dataclass(frozen=True, order=True)
class Cell:
    """One bundle: a GPUStack version for one target, installed one way."""

    version: str
    os: str
    arch: str
    device: str
    python: str
    extras: str
    method: str
    # Facts looked up from the matrix data; not part of the identity.
    cuda: str | None = field(default=None, compare=False)
    rocm: str | None = field(default=None, compare=False)
    glibc: str | None = field(default=None, compare=False)
    uv_platform: str = field(default="", compare=False)
    installer: str = field(default="", compare=False)  # a requirement, e.g. "uv==0.13.9"
    extra_names: tuple[str, ...] = field(default=(), compare=False)
    # GPUStack 2.x: the device as a runner backend, version (the host's floor) and variant; the
    # backend version from which on the worker asks for another runner (None: this is the
    # newest), the one it asks for when it detects no version; what a host of the backend needs.
    runner_device: Device | None = field(default=None, compare=False)
    ceiling: str | None = field(default=None, compare=False)
    newest: str | None = field(default=None, compare=False)
    vendor: Vendor | None = field(default=None, compare=False, repr=False)
    # GPUStack 0.x: the llama-box build of an accelerator device and how the target's worker
    # comes to pick it (None for cpu); upstream's image of the device (docker cells)
    toolkit: Toolkit | None = field(default=None, compare=False, repr=False)
    image: Image0 | None = field(default=None, compare=False, repr=False)

    @property
    def id(self) -> str:
        return (
            f"v{self.version}-{self.os}-{self.arch}-{self.device}"
            f"-py{self.python}-{self.extras}-{self.method}"
        )

    @property
    def axes(self) -> dict[str, str]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def requirement(self) -> str:
        """The top-level requirement, e.g. `gpustack[audio]==0.7.1`."""
        extras = f"[{','.join(self.extra_names)}]" if self.extra_names else ""
        return f"gpustack{extras}=={self.version}"

    @property
    def machine(self) -> str:
        """What `uname -m` prints on the target."""
        return _ARCH_MACHINE[self.arch]

    @property
    def series(self) -> int:
        """The GPUStack release line's major version: 0 (pip or image) or 2 (server + runners)."""
        return int(self.version.split(".", 1)[0])

    @property
    def floor(self) -> str:
        """What the target's driver or toolkit must have at least, as messages name it
        (`CUDA 12.8`, `CANN 8.2`), or `-`."""
        if self.vendor is not None and self.runner_device is not None:
            return f"{self.vendor.toolkit} {self.runner_device.version}"
        if self.vendor is not None and self.toolkit is not None:
            return f"{self.vendor.toolkit} {self.toolkit.device.version}"
        return f"CUDA {self.cuda}" if self.cuda else f"ROCm {self.rocm}" if self.rocm else "-"

    @property
    def docker_platform(self) -> str:
        return f"{self.os}/{self.arch}"

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            **self.axes,
            "cuda": self.cuda,
            "rocm": self.rocm,
            "backend": self.backend,
            "glibc": self.glibc,
            "requirement": self.requirement,
        }

    @property
    def backend(self) -> str | None:
        """The accelerator's backend (cuda, cann, rocm …): a 2.x runner's, a 0.x build's."""
        device = self.runner_device or (self.toolkit.device if self.toolkit else None)
        return device.backend if device else None

    def worker_options(self) -> tuple[str, ...]:
        """The `docker run` options of this device: a GPUStack 2.x worker's, as upstream's Add
        Worker command gives them; a 0.x image's, as upstream's installation docs run it (empty
        for other cells: cpu, 0.x CUDA, pip)."""
        if self.vendor is not None and self.runner_device is not None:
            return self.vendor.run_options(self.version, self.runner_device.version)
        if self.vendor is not None and self.toolkit is not None and self.image is not None:
            return self.vendor.run_options(self.version, self.toolkit.device.version)
        return ()


@dataclass(frozen=True)
class Rule:
    when: Mapping[str, Sequence[str]]
    require: Mapping[str, Sequence[str]]
    reason: str

    def refuses(self, axes: Mapping[str, str]) -> bool:
        applies = all(axes[a] in values for a, values in self.when.items())
        return applies and not all(axes[a] in values for a, values in self.require.items())


class Matrix:
    """The matrix data of one `matrix.toml`, with validation and selection; `runners` is the
    folder of upstream's runner data, which GPUStack 2.x versions read their devices from."""

    def __init__(
        self,
        data: Mapping[str, Any],
        source: str = "matrix.toml",
        text: str = "",
        runners: Path | None = None,
    ) -> None:
        self.source = source
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise CellError(
                f"{source}: unknown schema {schema!r}; this gpustack-offline reads schema "
                f"{SCHEMA}. Fix: set schema = {SCHEMA} and the layout it documents, or use the "
                "gpustack-offline release that wrote this file"
            )
        try:
            self.axes: dict[str, list[str]] = {
                a: _string_list(data["axes"][a], f"{source}: [axes] {a}") for a in AXES
            }
            self.defaults: dict[str, str] = dict(data.get("defaults", {}))
            self._os: dict[str, dict] = dict(data["os"])
            self._devices: dict[str, dict] = dict(data["devices"])
            self._extras: dict[str, list[str]] = dict(data["extras"])
            self._versions: dict[str, dict] = dict(data["versions"])
            self.vendors: dict[str, Vendor] = vendors(dict(data.get("backends", {})), source)
        except (KeyError, TypeError) as exc:
            raise CellError(f"{source}: malformed matrix data, missing or wrong {exc}") from exc
        self.rules = []
        for number, r in enumerate(data.get("rules", []), start=1):
            where = f"{source}{_rule_line(text, number)}: rule {number} ([[rules]])"
            try:
                when, require = (
                    {axis: _string_list(v, f"{where} {key}.{axis}") for axis, v in r[key].items()}
                    for key in ("when", "require")
                )
                self.rules.append(Rule(when, require, r["reason"]))
            except (KeyError, TypeError, AttributeError) as exc:
                raise CellError(
                    f"{source}{_rule_line(text, number)}: rule {number} ([[rules]]) is "
                    f"malformed, missing or wrong {exc}; each rule needs when, require and reason"
                ) from exc
        self._builds: dict[str, dict[str, tuple[str, ...]]] = {}  # 0.x: device -> platforms
        self._images: dict[str, dict[str, Image0]] = {}  # 0.x: device -> upstream's image
        self._read_builds()
        self._check_data()
        self._offers: dict[str, Offers] = {}
        self._no_offers: dict[str, str] = {}  # version -> why it has no devices yet
        self._read_runner_data(runners)
        self._cells = {c.id: c for c in self._enumerate()}

    @classmethod
    def load(cls, path: Path, runners: Path | None = None) -> Matrix:
        """The matrix at `path`; 2.x devices from the runner data in `runners` (by default the
        `runners` folder beside it, as in bundles/)."""
        data, text = read_toml_text(path, CellError, missing=f"matrix file {path} not found")
        return cls(data, source=str(path), text=text, runners=runners or path.parent / RUNNERS)

    def _read_builds(self) -> None:
        """Each 0.x version's llama-box builds and images, checked, its devices put on the axis."""
        for version, table in self._versions.items():
            if "builds" not in table:
                continue
            where = f'{self.source}: [versions."{version}"]'
            try:
                builds = {
                    str(d): tuple(_string_list(p, f"{where}.builds {d}"))
                    for d, p in table["builds"].items()
                }
                images = {
                    str(d): Image0(
                        str(i["tag"]), tuple(_string_list(i["platforms"], f"{where}.images {d}"))
                    )
                    for d, i in table.get("images", {}).items()
                }
                str(table["llama-box"])
            except (KeyError, TypeError, AttributeError) as exc:
                raise CellError(
                    f"{where} is malformed, missing or wrong {exc}: a 0.x version names its "
                    "llama-box release, its builds (device = [platforms]) and images "
                    "(device = { tag, platforms })"
                ) from exc
            for device, platforms in builds.items():
                self._toolkit(device, where)
                for platform in platforms:
                    os_, _, arch = platform.partition("/")
                    if os_ not in self.axes["os"] or arch not in self.axes["arch"]:
                        raise CellError(f"{where}.builds {device}: unknown platform {platform!r}")
                if device not in self.axes["device"]:
                    self.axes["device"].append(device)
            unbuilt = sorted(set(images) - set(builds))
            if unbuilt:
                raise CellError(f"{where}.images names {unbuilt}, which are no builds of it")
            self._builds[version], self._images[version] = builds, images

    def _toolkit(self, device: str, where: str = "") -> Toolkit | None:
        """The llama-box build of a 0.x accelerator device, or None for cpu."""
        if device == "cpu":
            return None
        parsed = Device.parse(device)
        vendor = self.vendors.get(parsed.backend) if parsed else None
        worker = vendor.line0.worker0 if vendor and vendor.line0 else None
        if parsed is None or worker is None:
            raise CellError(
                f"{where or self.source}: 0.x device {device!r} is not <backend><toolkit "
                'version>[-<chip>] of a backend with a [backends.<backend>."0.x"] table'
            )
        if parsed.variant and not worker.variant_env:
            raise CellError(f"{where}: {device}: the {parsed.backend} builds have no variants")
        return Toolkit(parsed, worker)

    def _read_runner_data(self, folder: Path | None) -> None:
        """Each 2.x version's devices from its runner data, put on the device axis."""
        for version, table in self._versions.items():
            if table.get("devices") is None:
                continue
            if table["devices"] != RUNNERS:
                raise CellError(
                    f'{self.source}: [versions."{version}"] devices = {table["devices"]!r}; '
                    f"the one source of a version's devices is {RUNNERS!r} (its runner data)"
                )
            if folder is None:
                raise CellError(
                    f"{self.source}: GPUStack {version} reads its devices from the runner data, "
                    "and no runner data folder was given (Matrix.load(path, runners=...))"
                )
            path = runner_data_path(folder, version)
            if not path.is_file():
                self._no_offers[version] = (
                    f"GPUStack {version}'s devices are read from its runner data, and {path} does "
                    "not exist yet: write it online as docs/building.md says (a new 2.x "
                    "version), review and commit it"
                )
                continue
            offers = self._offers[version] = Offers.load(path, version)
            for device in offers.devices:
                if device.name not in self.axes["device"]:
                    self.axes["device"].append(device.name)

    def _check_data(self) -> None:
        tables: tuple[tuple[str, Mapping[str, Any]], ...] = (
            ("os", self._os),
            ("device", self._devices),
            ("extras", self._extras),
            ("version", self._versions),
        )
        built = {d for builds in self._builds.values() for d in builds}
        for name, table in tables:
            missing = set(self.axes[name]) - set(table) - (built if name == "device" else set())
            if missing:
                raise CellError(
                    f"{self.source}: axis {name} lists {sorted(missing)} with no [{name}] table; "
                    "add one for each value"
                )
        for default_axis, value in self.defaults.items():
            if default_axis not in AXES or value not in self.axes[default_axis]:
                raise CellError(
                    f"{self.source}: default {default_axis}={value!r} is not on its axis"
                )
        for rule in self.rules:
            for axis, values in [*rule.when.items(), *rule.require.items()]:
                unknown = set(values) - set(self.axes.get(axis, []))
                if axis not in AXES or unknown:
                    raise CellError(
                        f"{self.source}: rule {rule.reason!r} names unknown {axis} values "
                        f"{sorted(unknown) or values}"
                    )

    def _make(self, axes: Mapping[str, str]) -> Cell:
        os_data = self._os[axes["os"]]
        names = tuple(self._extras[axes["extras"]])

        def cell(**facts: Any) -> Cell:
            return Cell(
                version=axes["version"], os=axes["os"], arch=axes["arch"], device=axes["device"],
                python=axes["python"], extras=axes["extras"], method=axes["method"],
                glibc=os_data.get("glibc"),
                uv_platform=os_data.get("uv-platform", {}).get(axes["arch"], ""),
                installer=os_data.get("installer", "") if axes["method"] == "pip" else "",
                extra_names=names,
                **facts,
            )  # fmt: skip

        offers = self._offers.get(axes["version"])
        if offers is None and axes["version"] in self._builds:
            toolkit = self._toolkit(axes["device"])
            backend, version = (
                (toolkit.device.backend, toolkit.device.version) if toolkit else ("", "")
            )
            # 0.x CUDA cells keep their own checks (CUDA_FLOOR); the other backends' are the
            # vendor's, as 2.x cells have them
            vendor = self.vendors[backend].line0 if backend not in ("", "cuda") else None
            image = self._images[axes["version"]].get(axes["device"])
            if axes["method"] != "docker":
                image = None
            elif vendor is not None:  # the host runs upstream's image: what its line needs
                vendor = vendor.for_image0(axes["version"], version)
            return cell(
                cuda=version if backend == "cuda" else None,
                rocm=version if backend == "rocm" else None,
                toolkit=toolkit,
                vendor=vendor,
                image=image,
            )
        if offers is None:
            facts = self._devices[axes["device"]]
            return cell(cuda=facts.get("cuda"), rocm=facts.get("rocm"))
        device = Device.parse(axes["device"])
        assert device is not None  # every device of the runner data spells back (Offers.load)
        return cell(
            cuda=device.version if device.backend == "cuda" else None,
            rocm=device.version if device.backend == "rocm" else None,
            runner_device=device,
            ceiling=offers.ceiling(device, axes["arch"], names),
            newest=offers.newest(device, axes["arch"], names),
            vendor=self.vendors[device.backend],
        )

    def _enumerate(self) -> Iterable[Cell]:
        """Every combination the rules and the runner data allow; a version's devices are its
        runner data's (2.x) or those with a [devices] table (0.x)."""
        others = [a for a in AXES if a not in ("version", "device")]
        for version in self.axes["version"]:
            if version in self._no_offers:
                continue
            offers = self._offers.get(version)
            if offers:
                devices = [d.name for d in offers.devices]
            elif version in self._builds:
                devices = [d for d in self.axes["device"] if d in self._builds[version]]
            else:
                devices = [d for d in self.axes["device"] if d in self._devices]
            for device in devices:
                for combo in itertools.product(*(self.axes[a] for a in others)):
                    axes = {
                        "version": version,
                        "device": device,
                        **dict(zip(others, combo, strict=True)),
                    }
                    if self.refusal(axes) is None:
                        yield self._make(axes)

    def refusal(self, axes: Mapping[str, str]) -> str | None:
        """Why the matrix refuses this combination of axis values, or None if it is a cell."""
        for rule in self.rules:
            if rule.refuses(axes):
                return rule.reason
        version = axes["version"]
        if version in self._no_offers:
            return self._no_offers[version]
        offers = self._offers.get(version)
        if offers is None and version in self._builds:
            return self._build_refusal(axes)
        if offers is None:
            if axes["device"] not in self._devices:
                return f"GPUStack {version} has no device {axes['device']!r} in [devices]"
            return None
        return self._runner_refusal(offers, axes)

    def _build_refusal(self, axes: Mapping[str, str]) -> str | None:
        """The limits of a 0.x version's llama-box builds and images, as rules with reasons."""
        version, device = axes["version"], axes["device"]
        release = self._versions[version]["llama-box"]
        where = f'its release workflow, as [versions."{version}"].builds in {self.source}'
        builds = self._builds[version]
        if device not in builds:
            return (
                f"GPUStack {version}'s devices are the builds of llama-box {release}, which its "
                f"worker runs ({where}): {', '.join(builds)}; {device} is none of them"
            )
        platform = f"{axes['os']}/{axes['arch']}"
        toolkit = self._toolkit(device)
        what = f"{device} ({toolkit.build})" if toolkit else device
        if platform not in builds[device]:
            return (
                f"llama-box {release}, which GPUStack {version}'s worker runs, is built for "
                f"{what} on {', '.join(builds[device])} only ({where})"
            )
        if axes["method"] != "docker":
            return None
        images = self._images[version]
        from_ = f'.github/workflows/docker-ci.yaml at v{version}, as [versions."{version}"].images'
        image = images.get(device)
        if image is None:
            return (
                f"GPUStack {version} publishes no image for {device}: its images are for "
                f"{', '.join(images)} ({from_})"
            )
        if platform not in image.platforms:
            return (
                f"GPUStack {version}'s {device} image (v{version}{image.tag}) is published for "
                f"{', '.join(image.platforms)} only ({from_})"
            )
        return None

    def _runner_refusal(self, offers: Offers, axes: Mapping[str, str]) -> str | None:
        """The limits of upstream's runner data, as rules with reasons naming its file."""
        device = Device.parse(axes["device"])
        where = f"upstream's runner data, {offers.path}"
        if device is None or device not in offers.devices:
            return (
                f"GPUStack {offers.version}'s devices are the non-deprecated runner backends, "
                f"versions and variants of {where}, and {axes['device']} is none of them"
            )
        if device.backend not in self.vendors:
            return (
                f"GPUStack {offers.version} has {device.backend} runners, but {self.source} has "
                f"no [backends.{device.backend}] table: add what a host of it needs (its device "
                "tool, version, container runtime, device nodes and run line, with sources)"
            )
        arches = offers.arches(device)
        if axes["arch"] not in arches:
            return (
                f"GPUStack {offers.version} publishes {device.name} runners for "
                f"{', '.join(f'linux/{a}' for a in arches)} only ({where})"
            )
        missing = offers.missing_service(device, axes["arch"], self._extras[axes["extras"]])
        if missing is not None:
            return (
                f"GPUStack {offers.version} has no {missing} runner for {device.name} on "
                f"linux/{axes['arch']} ({where}); its runners there serve "
                f"{', '.join(offers.services(device, axes['arch']))}"
            )
        return None

    @property
    def cells(self) -> list[Cell]:
        return sorted(self._cells.values(), key=lambda c: c.id)

    def nearest(self, text: str, n: int = 3) -> list[str]:
        plain = text.replace("*", "").replace("?", "")
        return difflib.get_close_matches(plain, list(self._cells), n=n, cutoff=0.4)

    def _unknown(self, what: str, reason: str) -> CellError:
        near = self.nearest(what)
        hint = f"; nearest valid: {', '.join(near)}" if near else ""
        return CellError(f"cell {what!r}: {reason}{hint}. `invoke matrix` lists every cell")

    def cell(self, cell_id: str) -> Cell:
        """The cell with this exact id, or a CellError saying why there is none."""
        if cell_id in self._cells:
            return self._cells[cell_id]
        match = _ID_RE.match(cell_id)
        if not match:
            raise self._unknown(
                cell_id, "not a cell id (v<version>-<os>-<arch>-<device>-py<X.Y>-<extras>-<method>)"
            )
        axes = match.groupdict()
        for axis, value in axes.items():
            if value not in self.axes[axis]:
                raise self._unknown(
                    cell_id, f"unknown {axis} {value!r} (known: {', '.join(self.axes[axis])})"
                )
        raise self._unknown(cell_id, f"impossible: {self.refusal(axes)}")

    def select(
        self, patterns: Sequence[str] = (), **filters: str | Sequence[str] | None
    ) -> list[Cell]:
        """Cells matching any pattern (or all, if none), narrowed by axis filters.

        Without patterns, `version` and `python` default to the matrix defaults, so that
        `--arch arm64` means the arm64 cells of the default GPUStack version and Python.
        A filter value may be a list or a comma-separated string.
        """
        wanted: dict[str, set[str]] = {}
        for axis, value in filters.items():
            if axis not in AXES:
                raise CellError(f"unknown axis {axis!r} (axes: {', '.join(AXES)})")
            values = _as_list(value)
            if not values and not patterns and axis in self.defaults:
                values = [self.defaults[axis]]
            if values:
                unknown = [v for v in values if v not in self.axes[axis]]
                if unknown:
                    raise CellError(
                        f"unknown {axis} {', '.join(unknown)} (known: {', '.join(self.axes[axis])})"
                    )
                wanted[axis] = set(values)
        if not patterns:
            for axis, default in self.defaults.items():
                wanted.setdefault(axis, {default})

        pool = self.cells
        if patterns:
            chosen: dict[str, Cell] = {}
            for pattern in patterns:
                if not any(ch in pattern for ch in "*?["):
                    cell = self.cell(pattern)
                    chosen[cell.id] = cell
                    continue
                hits = [c for c in pool if fnmatch.fnmatchcase(c.id, pattern)]
                if not hits:
                    raise self._unknown(pattern, "the pattern matches no cell")
                chosen.update((c.id, c) for c in hits)
            pool = sorted(chosen.values(), key=lambda c: c.id)

        result = [c for c in pool if all(getattr(c, a) in v for a, v in wanted.items())]
        if not result:
            raise CellError(self._why_empty(wanted, patterns))
        return result

    def _why_empty(self, wanted: Mapping[str, set[str]], patterns: Sequence[str]) -> str:
        combos = itertools.product(*(sorted(wanted.get(a, self.axes[a])) for a in AXES))
        reasons = {self.refusal(dict(zip(AXES, c, strict=True))) for c in combos} - {None}
        asked = " ".join(f"--{a} {','.join(sorted(v))}" for a, v in wanted.items())
        if patterns:
            asked = f"{' '.join(patterns)} {asked}"
        because = f": {'; '.join(sorted(r for r in reasons if r))}" if reasons else ""
        return f"no cell matches {asked.strip()}{because}. `invoke matrix` lists every cell"

    def ci_matrix(self, cells: Sequence[Cell]) -> dict[str, list[dict[str, object]]]:
        """A job matrix a CI system takes as it is (GitHub Actions `strategy.matrix`)."""
        return {"include": [c.as_dict() for c in cells]}


def _rule_line(text: str, number: int) -> str:
    """`, line N` of the number-th [[rules]] header in the matrix text, or "" if not found."""
    headers = [i for i, line in enumerate(text.splitlines(), 1) if line.strip() == "[[rules]]"]
    return f", line {headers[number - 1]}" if len(headers) >= number else ""


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v for item in value for v in _as_list(item)]


def _string_list(value: object, where: str) -> list[str]:
    """An axis' values as written: a list of strings, never a lone string taken letter by
    letter (`arch = "amd64"` would otherwise be the axis a, m, d, 6, 4)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CellError(
            f"{where} must be a list of strings, e.g. [{json.dumps(str(value))}], not {value!r}"
        )
    return value
