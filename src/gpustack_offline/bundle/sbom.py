"""A CycloneDX 1.6 SBOM of a bundle (`sbom.cdx.json`), made from its manifest and its files.

What a site's scanners need to know without opening the bundle: every wheel (name, version,
sha256, licence as the wheel declares it, where it came from), every image (reference, digest,
platform, and its layers as sub-components), every tool asset inside the tools archive (version,
download URL, sha256), and the shipped scripts. The bundle itself is the metadata component.

A model bundle's SBOM describes the model: the metadata component is a `machine-learning-model`
(purl `pkg:huggingface/<owner>/<name>@<commit>`; purl has no ModelScope type, so a ModelScope
model is `pkg:generic/<owner>/<name>@<commit>?repository_url=https://www.modelscope.cn`; its
source, repository, revision and commit as properties), and each file it carries is a component
with its sha256, size and download URL at that commit (the source's public endpoint, not the
mirror a build may have used): the weights (GGUF, safetensors, ...) as `machine-learning-model`
components with the same source properties, the rest (config, tokenizer) as `file` components.

The SBOM is a function of the manifest and the files it lists: the serial number is a uuid5 of
the manifest's digest and the timestamp is the manifest's `built_at`, so the same bundle always
gives the same bytes. The SBOM's own entry in the manifest is left out of that digest, so the
SBOM can be listed in the manifest and SHA256SUMS and still be regenerated from the finished
bundle byte for byte. An SBOM that does not validate against the CycloneDX schema is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import textwrap
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.parser import HeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from cyclonedx.model import (
    AttachedText,
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import License, LicenseAcknowledgement
from cyclonedx.output import OutputFormat, make_outputter
from cyclonedx.schema import SchemaVersion
from packageurl import PackageURL
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from gpustack_offline.bundle.errors import SbomError
from gpustack_offline.bundle.provenance import tool_url
from gpustack_offline.core.files import write_text
from gpustack_offline.stages.images import UPSTREAM_DIGEST, read_layout_file
from gpustack_offline.stages.model_sources import for_source
from gpustack_offline.stages.registry import Reference

try:  # the factory's home since cyclonedx-python-lib 11; the old path warns
    from cyclonedx.contrib.license.factories import LicenseFactory
except ImportError:  # pragma: no cover - older library
    from cyclonedx.factory.license import LicenseFactory  # type: ignore[no-redef]

SBOM_NAME = "sbom.cdx.json"
SCHEMA = SchemaVersion.V1_6
PREFIX = "gpustack-offline"  # namespace of this project's CycloneDX properties
_SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/gpustack/gpustack#offline")
_TOOL_PATH = re.compile(r"(?P<owner>[^/]+)/(?P<repo>[^/]+)/releases/download/(?P<ver>[^/]+)/.+")
_BUILT_FROM = re.compile(r"built from (?P<url>\S+) \(sha256 (?P<sha>[0-9a-f]{64})\)")
_DECLARED = LicenseAcknowledgement.DECLARED
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")  # RFC 2047
# Trove classifiers that name exactly one SPDX licence; others are kept by name.
_CLASSIFIER_SPDX = {
    "Apache Software License": "Apache-2.0",
    "MIT License": "MIT",
    "MIT No Attribution License (MIT-0)": "MIT-0",
    "ISC License (ISCL)": "ISC",
    "Python Software Foundation License": "PSF-2.0",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "The Unlicense (Unlicense)": "Unlicense",
    "Zero-Clause BSD (0BSD)": "0BSD",
    "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0-only",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU Library or Lesser General Public License (LGPL)": "LGPL-2.0-or-later",
}
# A model file whose bytes are the model (weights), by suffix; the others are plain files.
_WEIGHTS = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
            ".tflite", ".npz")  # fmt: skip


# --- entry points ---------------------------------------------------------------------------


def sbom_for(stage: Path, manifest: Mapping[str, Any]) -> str:
    """The SBOM's JSON text for the bundle folder `stage` whose manifest is `manifest`.

    Call it once every other file is in `stage` and the manifest is complete; write the text to
    `stage / SBOM_NAME` and list that file in the manifest and SHA256SUMS afterwards."""
    bom = _bom(stage, manifest)
    text = make_outputter(bom, OutputFormat.JSON, SCHEMA).output_as_string(indent=2) + "\n"
    validate(text)
    return text


def sbom(bundle_dir: Path) -> dict[str, Any]:
    """The SBOM of a finished bundle folder, as data."""
    result: dict[str, Any] = json.loads(sbom_for(bundle_dir, read_manifest(bundle_dir)))
    return result


def write_sbom(bundle_dir: Path) -> Path:
    """Write `sbom.cdx.json` into a finished bundle folder (not listed in its SHA256SUMS: a
    build lists it through `sbom_for`)."""
    final = bundle_dir / SBOM_NAME
    write_text(final, sbom_for(bundle_dir, read_manifest(bundle_dir)))
    return final


def validate(text: str) -> None:
    """Raise SbomError unless `text` is a valid CycloneDX 1.6 JSON document."""
    # imported here: jsonschema's format checkers compile grammars for seconds at import, which
    # every `invoke` that builds nothing would pay
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SCHEMA).validate_str(text)
    if error is not None:
        detail = error.data  # jsonschema's error: its str() holds the whole schema
        where = "/".join(str(p) for p in getattr(detail, "absolute_path", ())) or "(document)"
        raise SbomError(
            f"the SBOM does not validate against the CycloneDX {SCHEMA.to_version()} schema: "
            f"at {where}: {getattr(detail, 'message', detail)}. It was not written; this is a "
            "bug in gpustack_offline.bundle.sbom"
        )


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / "manifest.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SbomError(f"{path} is missing: {bundle_dir} is not a finished bundle") from exc
    except json.JSONDecodeError as exc:
        raise SbomError(f"{path} is not valid JSON ({exc}); rebuild the bundle") from exc
    return data


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without the SBOM's own file entry."""
    content = dict(manifest)
    content["files"] = [f for f in manifest.get("files", []) if f.get("path") != SBOM_NAME]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- the document ---------------------------------------------------------------------------


def _bom(stage: Path, manifest: Mapping[str, Any]) -> Bom:
    if manifest.get("model"):
        return _model_bom(manifest)
    cell = manifest["cell"]
    digest = manifest_digest(manifest)
    bom = _empty_bom(manifest, digest)
    root = Component(
        type=ComponentType.APPLICATION,
        name="gpustack",
        version=str(manifest["gpustack_version"]),
        bom_ref=f"bundle:{cell['id']}",
        purl=PackageURL("pypi", name="gpustack", version=str(manifest["gpustack_version"])),
        description=f"GPUStack offline bundle {cell['id']}",
        properties=[
            *_properties("cell", {k: v for k, v in cell.items() if k != "id"}),
            Property(name=f"{PREFIX}:cell", value=str(cell["id"])),
            Property(name=f"{PREFIX}:manifest-sha256", value=digest),
            *_properties("lock", manifest.get("lock") or {}),
        ],
        external_references=[
            ExternalReference(
                type=ExternalReferenceType.WEBSITE,
                url=XsUri("https://github.com/gpustack/gpustack"),
            )
        ],
    )
    bom.metadata.component = root

    files = {str(f["path"]): f for f in manifest.get("files", [])}
    top: list[Component] = []
    for _, entry in sorted(files.items()):
        if entry.get("kind") in ("wheel", "built-wheel"):
            top.append(_wheel(stage, entry))
        elif entry.get("kind") == "script":
            top.append(_file(entry))
    if manifest.get("tools"):
        top.append(_tools(manifest["tools"], files))
    if manifest.get("images"):
        top.append(_images(stage, manifest["images"], files))
    bom.components.update(top)
    bom.register_dependency(root, top)
    return bom


def _empty_bom(manifest: Mapping[str, Any], digest: str) -> Bom:
    """The document's frame: serial number from the manifest's digest, its time, this tool."""
    bom = Bom(serial_number=uuid.uuid5(_SERIAL_NAMESPACE, f"sha256:{digest}"))
    bom.metadata.timestamp = _timestamp(str(manifest["built_at"]))
    project = manifest.get("tool") or {}
    bom.metadata.tools.components.add(
        Component(
            type=ComponentType.APPLICATION,
            name=str(project.get("name", "gpustack-offline")),
            version=str(project.get("version", "")),
            bom_ref="tool:gpustack-offline",
            properties=[Property(name=f"{PREFIX}:commit", value=str(project.get("commit")))],
        )
    )
    return bom


def _timestamp(built_at: str) -> datetime:
    try:
        return datetime.strptime(built_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise SbomError(f"manifest built_at {built_at!r} is not YYYY-MM-DDTHH:MM:SSZ") from exc


def _properties(group: str, values: Mapping[str, Any]) -> list[Property]:
    return [
        Property(name=f"{PREFIX}:{group}:{key}", value=str(value))
        for key, value in sorted(values.items())
        if value not in (None, "", [])
    ]


def _sha256(hex_digest: str) -> HashType:
    return HashType(alg=HashAlgorithm.SHA_256, content=hex_digest.removeprefix("sha256:"))


def _file(entry: Mapping[str, Any]) -> Component:
    return Component(
        type=ComponentType.FILE,
        name=str(entry["path"]),
        bom_ref=f"file:{entry['path']}",
        hashes=[_sha256(entry["sha256"])],
        properties=_properties("file", {"kind": entry.get("kind"), "size": entry.get("size")}),
    )


# --- models ---------------------------------------------------------------------------------


def _model_bom(manifest: Mapping[str, Any]) -> Bom:
    model = manifest["model"]
    bundle_id = str((manifest.get("bundle") or {}).get("id") or f"model-{model['name']}")
    digest = manifest_digest(manifest)
    bom = _empty_bom(manifest, digest)
    owner, _, name = str(model["repository"]).partition("/")
    source = {
        "source": model["source"],
        "repository": model["repository"],
        "revision": model["revision"],
        "commit": model["commit"],
    }
    root = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=str(model["name"]),
        version=str(model["commit"]),
        group=owner,
        bom_ref=f"bundle:{bundle_id}",
        purl=_model_purl(model),
        description=f"GPUStack offline model bundle {bundle_id}: {model['repository']}",
        properties=[
            *_properties(
                "model",
                {
                    **source,
                    "backend": model.get("backend"),
                    "entry": model.get("entry"),
                    "size": model.get("size"),
                },
            ),
            Property(name=f"{PREFIX}:bundle", value=bundle_id),
            Property(name=f"{PREFIX}:manifest-sha256", value=digest),
            *_properties("lock", manifest.get("lock") or {}),
        ],  # fmt: skip
        external_references=[
            ExternalReference(
                type=ExternalReferenceType.WEBSITE,
                url=XsUri(
                    for_source(str(model["source"])).web_url(
                        str(model["repository"]), str(model["commit"])
                    )
                ),
            )
        ],
    )
    bom.metadata.component = root
    top: list[Component] = []
    folder = f"models/{model['name']}/"
    for entry in sorted(manifest.get("files", []), key=lambda f: str(f["path"])):
        if entry.get("kind") == "model-file":
            top.append(_model_file(model, source, str(entry["path"]).removeprefix(folder), entry))
        elif entry.get("kind") == "script":
            top.append(_file(entry))
    bom.components.update(top)
    bom.register_dependency(root, top)
    return bom


def _model_purl(model: Mapping[str, Any]) -> PackageURL:
    owner, _, name = str(model["repository"]).partition("/")
    commit = str(model["commit"])
    if model["source"] == "huggingface":  # purl's own type (huggingface.co by default)
        return PackageURL("huggingface", namespace=owner, name=name, version=commit)
    # purl has no type for ModelScope: generic, naming the site it comes from
    site = for_source(str(model["source"])).DEFAULT_ENDPOINT
    return PackageURL(
        "generic", namespace=owner, name=name, version=commit,
        qualifiers={"repository_url": site},
    )  # fmt: skip


def _model_file(
    model: Mapping[str, Any], source: Mapping[str, Any], path: str, entry: Mapping[str, Any]
) -> Component:
    sha = _sha256(entry["sha256"])
    weights = path.lower().endswith(_WEIGHTS)
    public = for_source(str(model["source"]))
    url = public.file_url(
        public.DEFAULT_ENDPOINT, str(model["repository"]), str(model["commit"]), path
    )
    purl = _model_purl(model)
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL if weights else ComponentType.FILE,
        name=path,
        version=str(model["commit"]),
        bom_ref=f"{purl.to_string()}#{path}",
        hashes=[sha],
        external_references=[
            ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(url), hashes=[sha])
        ],  # fmt: skip
        properties=[
            *(_properties("model", source) if weights else []),
            *_properties("file", {"path": entry["path"], "size": entry.get("size")}),
        ],
    )


# --- wheels ---------------------------------------------------------------------------------


def _wheel(stage: Path, entry: Mapping[str, Any]) -> Component:
    rel = str(entry["path"])
    filename = rel.rsplit("/", 1)[-1]
    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename as exc:
        raise SbomError(f"{rel}: not a wheel file name ({exc})") from exc
    purl = PackageURL("pypi", name=name, version=str(version), qualifiers={"file_name": filename})
    sha = _sha256(entry["sha256"])
    origin = str(entry.get("origin", ""))
    # The download URL is a property, not an external reference: the schema checks those as
    # IRIs, at about 0.15 s each with jsonschema's parser, too slow for hundreds of wheels.
    # The purl (pypi, name, version, file_name) names the file on the index just as well.
    refs = []
    built = _BUILT_FROM.fullmatch(origin)
    if built:
        refs.append(
            ExternalReference(
                type=ExternalReferenceType.SOURCE_DISTRIBUTION,
                url=XsUri(built["url"]),
                hashes=[_sha256(built["sha"])],
            )
        )
    return Component(
        type=ComponentType.LIBRARY,
        name=str(name),
        version=str(version),
        bom_ref=purl.to_string(),
        purl=purl,
        hashes=[sha],
        licenses=wheel_licenses(stage / rel),
        external_references=refs,
        properties=_properties(
            "file",
            {"path": rel, "kind": entry.get("kind"), "size": entry.get("size"), "origin": origin},
        ),
    )


def wheel_metadata(path: Path) -> dict[str, list[str]]:
    """The fields of a wheel's `*.dist-info/METADATA` as text: lower-case name -> its values.

    Parsed from text decoded as UTF-8 (as the core metadata spec has it; Latin-1 if it is not),
    so a non-ASCII value is a str like any other, not the `email.header.Header` that parsing the
    bytes hands back. RFC 2047 encoded words are decoded and the continuation indent of a
    multi-line value is removed."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                raise SbomError(f"{path} has {len(names)} .dist-info/METADATA files, not one")
            data = zf.read(names[0])
    except (zipfile.BadZipFile, OSError) as exc:
        raise SbomError(f"{path}: cannot read the wheel ({exc}); rebuild the bundle") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    # the parse packaging.metadata.parse_email does on text; from text (not bytes) every value
    # comes back a str, never an email.header.Header
    message = HeaderParser(policy=compat32).parsestr(text)
    return {
        name.lower(): [_unfolded(str(v)) for v in message.get_all(name) or []]
        for name in dict.fromkeys(message.keys())
    }


def _unfolded(value: str) -> str:
    """A header value as its author wrote it: encoded words decoded, and the continuation lines
    of a multi-line value without the indent that folded them (the spec's 7 spaces and `|`, or
    whatever whitespace they all share: setuptools writes 8 spaces, matplotlib's wheel has 9)."""
    first, *rest = re.split(r"\r\n|\r|\n", value)
    if rest and all(line.startswith("       |") for line in rest):
        rest = [line[8:] for line in rest]
    elif rest:
        rest = textwrap.dedent("\n".join(rest)).split("\n")
    return "\n".join(_decoded(line) for line in [first, *rest])


def _decoded(line: str) -> str:
    if not _ENCODED_WORD.search(line):
        return line
    try:
        return str(make_header(decode_header(line)))
    except (HeaderParseError, LookupError, ValueError):  # ValueError: bad base64 or bytes
        return line  # not really encoded words: kept as written


def wheel_licenses(path: Path) -> list[License]:
    """The licence a wheel declares: License-Expression (PEP 639), else a one-line License
    field, else its licence classifiers, else a longer License text by its first line."""
    meta = wheel_metadata(path)
    factory = LicenseFactory()
    expression = next(iter(meta.get("license-expression", [])), "").strip()
    if expression:
        return [factory.make_from_string(expression, license_acknowledgement=_DECLARED)]
    field = next(iter(meta.get("license", [])), "").strip()
    if field and "\n" not in field and len(field) <= 100 and field.upper() != "UNKNOWN":
        return [factory.make_from_string(field, license_acknowledgement=_DECLARED)]
    licenses: list[License] = []
    for classifier in meta.get("classifier", []):
        parts = [p.strip() for p in classifier.split("::")]
        if parts[0] != "License" or len(parts) < 2 or parts[-1] == "OSI Approved":
            continue
        spdx = _CLASSIFIER_SPDX.get(parts[-1])
        licenses.append(
            factory.make_with_id(spdx, acknowledgement=_DECLARED)
            if spdx
            else factory.make_with_name(parts[-1], acknowledgement=_DECLARED)
        )
    if licenses:
        return licenses
    if field and field.upper() != "UNKNOWN":
        first = field.splitlines()[0].strip()[:100] or "see text"
        return [
            factory.make_with_name(
                first, text=AttachedText(content=field), acknowledgement=_DECLARED
            )
        ]
    return []


# --- tools ----------------------------------------------------------------------------------


def _tools(tools: Mapping[str, Any], files: Mapping[str, Any]) -> Component:
    """The tools archive as a file component whose sub-components are the assets in it."""
    archive = str(tools["archive"])
    base = str(tools.get("base_url", ""))
    assets = []
    for asset in sorted(tools.get("assets", []), key=lambda a: str(a["path"])):
        path = str(asset["path"])
        url = tool_url(base, path)
        filename = path.rsplit("/", 1)[-1]
        sha = _sha256(asset["sha256"])
        match = _TOOL_PATH.fullmatch(path)
        if match:
            name, version = match["repo"], match["ver"]
            purl = PackageURL(
                "github",
                namespace=match["owner"],
                name=name,
                version=version,
                qualifiers={"download_url": url},
            )
        else:
            name, version = filename, ""
            purl = PackageURL("generic", name=filename, qualifiers={"download_url": url})
        assets.append(
            Component(
                type=ComponentType.APPLICATION,
                name=name,
                version=version,
                group=match["owner"] if match else None,
                bom_ref=f"tool:{path}",
                purl=purl,
                hashes=[sha],
                external_references=[
                    ExternalReference(
                        type=ExternalReferenceType.DISTRIBUTION, url=XsUri(url), hashes=[sha]
                    )
                ],
                properties=_properties("tool", {"file": filename, "size": asset.get("size")}),
            )
        )
    entry = files.get(archive, {})
    return Component(
        type=ComponentType.FILE,
        name=archive,
        bom_ref=f"file:{archive}",
        hashes=[_sha256(str(entry.get("sha256") or tools["sha256"]))],
        components=assets,
        properties=_properties(
            "tools",
            {
                "llama_box_dir": tools.get("llama_box_dir"),
                "retargeted_from": tools.get("retargeted_from"),
                "wanted_before_fix": ", ".join(tools.get("wanted_before_fix") or []),
            },
        ),
    )


# --- images ---------------------------------------------------------------------------------


def _images(
    stage: Path, images: Iterable[Mapping[str, Any]], files: Mapping[str, Any]
) -> Component:
    """The images' entry file (the export's `index.json`, which names every manifest and so
    every blob by digest; an older bundle's archive tar) as a file component holding one
    container component per image, each with its layers (from the export's own manifests) as
    file sub-components."""
    archive = next((p for p, f in files.items() if f.get("kind") == "images"), None)
    if archive is None:
        raise SbomError("the manifest lists images but no file of kind 'images' (index.json)")
    layers = image_layers(stage / archive)
    containers = []
    for image in sorted(images, key=lambda i: (str(i["reference"]), str(i["platform"]))):
        ref = Reference.parse(str(image["reference"]))
        digest = str(image["digest"])
        os_, _, arch = str(image["platform"]).partition("/")
        qualifiers = {"repository_url": ref.name, "arch": arch.replace("/", "")}
        if ref.tag:
            qualifiers["tag"] = ref.tag
        purl = PackageURL(
            "oci", name=ref.repository.rsplit("/", 1)[-1], version=digest, qualifiers=qualifiers
        )
        found = layers.get(digest)
        if found is None:
            raise SbomError(f"{archive} has no manifest {digest} for {image['reference']}")
        containers.append(
            Component(
                type=ComponentType.CONTAINER,
                name=ref.name,
                version=ref.tag or digest,
                bom_ref=purl.to_string(),
                purl=purl,
                hashes=[_sha256(digest)],
                components=[
                    Component(
                        type=ComponentType.FILE,
                        name=layer["digest"],
                        bom_ref=f"{purl.to_string()}#layer-{n}",
                        hashes=[_sha256(layer["digest"])],
                        properties=_properties(
                            "layer",
                            {"index": n, "mediaType": layer["mediaType"], "size": layer["size"]},
                        ),
                    )
                    for n, layer in enumerate(found)
                ],
                properties=_properties(
                    "image", {"platform": image["platform"], "os": os_, "layers": len(found)}
                ),
            )
        )
    return Component(
        type=ComponentType.FILE,
        name=archive,
        bom_ref=f"file:{archive}",
        hashes=[_sha256(files[archive]["sha256"])],
        components=containers,
    )


def image_layers(archive: Path) -> dict[str, list[dict[str, Any]]]:
    """Layers of each image in an export, by the image's upstream manifest digest: `archive` is
    the export folder's `index.json` (or the folder), or an older bundle's export tar.

    Reads `index.json` and the manifests it names; the layer blobs themselves are not read."""
    source = archive.parent if archive.name == "index.json" else archive
    try:

        def member_json(name: str) -> Any:
            data = read_layout_file(source, name)
            if data is None:
                raise KeyError(name)
            return json.loads(data)

        index = member_json("index.json")
        out = {}
        for entry in index.get("manifests", []):
            upstream = (entry.get("annotations") or {}).get(UPSTREAM_DIGEST) or entry["digest"]
            manifest = member_json(f"blobs/sha256/{entry['digest'].removeprefix('sha256:')}")
            out[str(upstream)] = [
                {"digest": d["digest"], "size": d["size"], "mediaType": d["mediaType"]}
                for d in manifest.get("layers", [])
            ]
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise SbomError(f"{archive}: cannot read the image export's manifests ({exc})") from exc
    return out
