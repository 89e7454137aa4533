"""The CycloneDX SBOM of a bundle: made from a real assembled bundle folder (tiny wheels built
here with licences in their METADATA, a real tools archive entry, a real image export), checked
against the CycloneDX 1.6 schema with the library's strict validator."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from support.bundles import WHEELS, make_bundle, make_wheel
from support.registry_fixture import gpustack_tags

from gpustack_offline.bundle import assemble as bundle
from gpustack_offline.bundle import sbom
from gpustack_offline.stages import tools


@pytest.fixture(scope="module")
def built(matrix, root, tmp_path_factory) -> Path:
    return make_bundle(matrix, root, tmp_path_factory.mktemp("sbom"))


def _walk(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in components:
        out.append(c)
        out += _walk(c.get("components", []))
    return out


def _sha(component: dict[str, Any]) -> str:
    (digest,) = [h["content"] for h in component["hashes"] if h["alg"] == "SHA-256"]
    return digest


def test_the_sbom_validates_against_the_cyclonedx_schema(built):
    text = (built / sbom.SBOM_NAME).read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    doc = json.loads(text)
    assert (doc["bomFormat"], doc["specVersion"]) == ("CycloneDX", "1.6")
    root = doc["metadata"]["component"]
    assert (root["name"], root["version"], root["type"]) == ("gpustack", "0.7.1", "application")
    assert doc["metadata"]["timestamp"].startswith(
        json.loads((built / "manifest.json").read_text())["built_at"][:19]
    )
    # listed like every other file: sha256sum accepts the bundle with its SBOM
    assert f"  {sbom.SBOM_NAME}\n" in (built / "SHA256SUMS").read_text()
    subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"], cwd=built, check=True)


def test_every_wheel_appears_with_version_hash_purl_and_licence(built):
    doc = sbom.sbom(built)
    manifest = json.loads((built / "manifest.json").read_text())
    by_name = {c["name"]: c for c in _walk(doc["components"]) if c["type"] == "library"}
    wheels = [f for f in manifest["files"] if f["kind"] in ("wheel", "built-wheel")]
    assert len(wheels) == len(WHEELS) == len(by_name)
    for entry in wheels:
        name, version = entry["path"].removeprefix("wheels/").split("-")[:2]
        component = by_name[name]
        assert component["version"] == version and _sha(component) == entry["sha256"]
        assert component["purl"].startswith(f"pkg:pypi/{name}@{version}?file_name=")
    assert by_name["six"]["licenses"] == [{"license": {"id": "MIT", "acknowledgement": "declared"}}]
    assert by_name["attrs"]["licenses"] == [
        {"expression": "MIT OR Apache-2.0", "acknowledgement": "declared"}
    ]
    assert by_name["certifi"]["licenses"][0]["license"]["id"] == "MPL-2.0"
    # a wheel from PyPI names its download, a built one the sdist it came from
    origin = {"name": "gpustack-offline:file:origin", "value": WHEELS[0][3]}
    assert origin in by_name["six"]["properties"]
    (ref,) = by_name["certifi"]["externalReferences"]
    assert ref["type"] == "source-distribution" and ref["hashes"][0]["content"] == "c" * 64


def test_every_image_appears_with_digest_and_its_layers(built):
    doc = sbom.sbom(built)
    manifest = json.loads((built / "manifest.json").read_text())
    (image,) = manifest["images"]
    (container,) = [c for c in _walk(doc["components"]) if c["type"] == "container"]
    assert container["name"] == "docker.io/gpustack/gpustack"
    assert container["version"] == "v0.7.1-cpu"
    assert _sha(container) == image["digest"].removeprefix("sha256:")
    assert container["purl"].startswith(f"pkg:oci/gpustack@{image['digest']}?")
    assert "repository_url=docker.io/gpustack/gpustack" in container["purl"]
    index = "gpustack-offline:layer:index"
    layers = sorted(
        container["components"],
        key=lambda c: int(next(p["value"] for p in c["properties"] if p["name"] == index)),
    )
    expected = gpustack_tags()["v0.7.1-cpu"]["linux/amd64"].layers
    assert [f"sha256:{_sha(layer)}" for layer in layers] == [b.digest for b in expected]
    # the layers really are blobs of the bundle's image export
    blobs = built / bundle.IMAGE_ARCHIVE / "blobs" / "sha256"
    assert all((blobs / _sha(layer)).is_file() for layer in layers)


def test_every_tool_appears_with_version_download_url_and_hash(built):
    doc = sbom.sbom(built)
    manifest = json.loads((built / "manifest.json").read_text())
    (archive,) = [c for c in doc["components"] if c["name"] == tools.BUNDLE_PATH]
    files = {f["path"]: f for f in manifest["files"]}
    assert _sha(archive) == files[tools.BUNDLE_PATH]["sha256"]
    found = {c["name"]: c for c in archive["components"]}
    assert set(found) == {"llama-box", "gguf-parser-go"}
    for asset in manifest["tools"]["assets"]:
        component = found[asset["path"].split("/")[1]]
        assert component["version"] == asset["path"].split("/")[4]
        assert _sha(component) == asset["sha256"]
        (ref,) = component["externalReferences"]
        assert ref["type"] == "distribution"
        assert ref["url"] == f"https://github.com/{asset['path']}"


def test_the_sbom_is_deterministic_and_regenerates_byte_for_byte(built, matrix, root, tmp_path):
    stored = (built / sbom.SBOM_NAME).read_text()
    assert sbom.sbom_for(built, json.loads((built / "manifest.json").read_text())) == stored
    assert sbom.write_sbom(built).read_text() == stored
    # an independent build of the same inputs at the same time: the same bytes
    again = make_bundle(matrix, root, tmp_path / "again")
    manifest = json.loads((again / "manifest.json").read_text())
    first = json.loads((built / "manifest.json").read_text())
    if manifest["built_at"] != first["built_at"]:  # builds straddled a second
        manifest["built_at"] = first["built_at"]
    assert sbom.sbom_for(again, manifest) == stored
    # a different input changes the serial number
    changed = copy.deepcopy(manifest)
    changed["lock"]["sha256"] = "0" * 64
    doc, other = json.loads(stored), json.loads(sbom.sbom_for(again, changed))
    assert other["serialNumber"] != doc["serialNumber"]


def test_an_invalid_sbom_is_refused(built):
    doc = json.loads((built / sbom.SBOM_NAME).read_text())
    doc["components"][0]["hashes"][0]["content"] = "not-hex"
    with pytest.raises(sbom.SbomError, match="does not validate"):
        sbom.validate(json.dumps(doc))
    doc = json.loads((built / sbom.SBOM_NAME).read_text())
    doc["components"][0]["type"] = "wheel"
    with pytest.raises(sbom.SbomError, match="1.6 schema: at components/0/type: .wheel. is not"):
        sbom.validate(json.dumps(doc))


def test_licences_fall_back_to_classifiers_then_the_license_text(tmp_path):
    classifiers = (
        "Classifier: License :: OSI Approved :: Apache Software License\n"
        "Classifier: License :: Other/Proprietary License\n"
    )
    classified = sbom.wheel_licenses(make_wheel(tmp_path, "classified", "1.0", classifiers))
    assert [(lic.id, lic.name) for lic in classified] == [
        ("Apache-2.0", None),
        (None, "Other/Proprietary License"),
    ]
    long_text = "License: Copyright (c) 2024 Someone\n        Permission is hereby granted\n"
    (long,) = sbom.wheel_licenses(make_wheel(tmp_path, "long", "1.0", long_text))
    assert long.name == "Copyright (c) 2024 Someone" and "Permission" in long.text.content
    assert sbom.wheel_licenses(make_wheel(tmp_path, "none", "1.0", "License: UNKNOWN\n")) == []


# The shape of matplotlib 3.11.2's METADATA (which stopped `invoke bundle` of every audio cell):
# a License field of many folded lines, some with non-ASCII text, and a licence classifier.
MATPLOTLIB_LICENSE = (
    "License: License agreement for matplotlib versions 1.3.0 and later\n"
    "         =========================================================\n"
    "         \n"
    "         1. This LICENSE AGREEMENT is between the Matplotlib Development Team\n"
    "           Copyright \u00a9 2010-2022  Google, Inc.\n"
    "           Copyright \u00a9 2011  Martin Hosken and SIL International\n"
)
PSF = "Classifier: License :: OSI Approved :: Python Software Foundation License\n"


def _names(licences: list[Any]) -> list[tuple[str | None, str | None]]:
    return [(lic.id, lic.name) for lic in licences]


def test_a_non_ascii_licence_is_read_as_text_not_a_header_object(tmp_path):
    """Parsed from bytes, a non-ASCII value came back an email.header.Header: no .strip()."""
    one_line = "License: Lizenz f\u00fcr alle \u2013 \u00a9 2025 J\u00f6rg\n"
    (lic,) = sbom.wheel_licenses(make_wheel(tmp_path, "oneline", "1.0", one_line))
    assert lic.name == "Lizenz f\u00fcr alle \u2013 \u00a9 2025 J\u00f6rg"
    # the classifier wins over a licence text; the text alone is kept whole, without the indent
    both = make_wheel(tmp_path, "matplotlib", "3.11.2", MATPLOTLIB_LICENSE + PSF)
    assert _names(sbom.wheel_licenses(both)) == [("PSF-2.0", None)]
    (text,) = sbom.wheel_licenses(make_wheel(tmp_path, "textonly", "1.0", MATPLOTLIB_LICENSE))
    assert text.name == "License agreement for matplotlib versions 1.3.0 and later"
    assert text.text.content.splitlines()[1:5] == [
        "=" * 57,
        "",
        "1. This LICENSE AGREEMENT is between the Matplotlib Development Team",
        "  Copyright \u00a9 2010-2022  Google, Inc.",
    ]
    # a non-ASCII licence classifier is kept by its name, not mangled
    other = "Classifier: License :: Free for research \u2013 \u00a9 Someone\n"
    (named,) = sbom.wheel_licenses(make_wheel(tmp_path, "other", "1.0", other))
    assert named.name == "Free for research \u2013 \u00a9 Someone"


def test_every_metadata_field_reads_as_str(tmp_path):
    headers = (
        "Summary: Gr\u00fc\u00dfe \u2013 a summary\n"
        "Home-page: https://example.org/caf\u00e9\n"
        "Author: J\u00f6rg M\u00fcller\n"
        "Project-URL: Source, https://example.org/\u00e9\n"
        "Project-URL: Docs, https://example.org/docs\n"
        "License-Expression: MIT OR Apache-2.0\n"
        "License: \u00a9 J\u00f6rg\n" + PSF
    )
    meta = sbom.wheel_metadata(make_wheel(tmp_path, "fields", "1.0", headers))
    assert all(isinstance(v, str) for values in meta.values() for v in values)
    assert meta["name"] == ["fields"] and meta["version"] == ["1.0"]
    assert meta["summary"] == ["Gr\u00fc\u00dfe \u2013 a summary"]
    assert meta["home-page"] == ["https://example.org/caf\u00e9"]
    assert meta["author"] == ["J\u00f6rg M\u00fcller"]
    assert meta["project-url"] == [
        "Source, https://example.org/\u00e9",
        "Docs, https://example.org/docs",
    ]
    assert meta["license"] == ["\u00a9 J\u00f6rg"] and meta["classifier"] == [PSF[12:-1]]
    # License-Expression (PEP 639) wins over the License field and the classifiers
    (expression,) = sbom.wheel_licenses(make_wheel(tmp_path, "fields", "1.0", headers))
    assert expression.value == "MIT OR Apache-2.0"


def test_encoded_words_latin1_crlf_and_the_spec_s_pipe_folding_are_read(tmp_path):
    """Older tools wrote non-ASCII as RFC 2047 encoded words, some wrote Latin-1 or CRLF, and the
    core metadata spec folds a multi-line field with 7 spaces and `|`."""
    encoded = "License: =?utf-8?q?Lizenz_f=C3=BCr_alle?=\n"
    (lic,) = sbom.wheel_licenses(make_wheel(tmp_path, "encoded", "1.0", encoded))
    assert lic.name == "Lizenz f\u00fcr alle"
    base64 = "License: =?utf-8?b?wqkgSsO2cmc=?=\n"  # "\u00a9 J\u00f6rg"
    (lic,) = sbom.wheel_licenses(make_wheel(tmp_path, "b64", "1.0", base64))
    assert lic.name == "\u00a9 J\u00f6rg"
    not_encoded = "License: a =?no-such-charset?q?x?= b\n"
    (lic,) = sbom.wheel_licenses(make_wheel(tmp_path, "plain", "1.0", not_encoded))
    assert lic.name == "a =?no-such-charset?q?x?= b"
    latin1 = "License: Lizenz f\u00fcr alle\n"
    wheel = make_wheel(tmp_path, "latin", "1.0", latin1, encoding="latin-1")
    assert _names(sbom.wheel_licenses(wheel)) == [(None, "Lizenz f\u00fcr alle")]
    folded = "License: Copyright \u00a9 2024 J\u00f6rg\n       |\n       |  Permission granted\n"
    crlf = make_wheel(tmp_path, "crlf", "1.0", folded, newline="\r\n")
    (lic,) = sbom.wheel_licenses(crlf)
    assert lic.name == "Copyright \u00a9 2024 J\u00f6rg"
    assert lic.text.content == "Copyright \u00a9 2024 J\u00f6rg\n\n  Permission granted"


def test_a_bundle_with_non_ascii_licences_has_a_valid_sbom(matrix, root, tmp_path):
    wheels = (
        *WHEELS,
        ("matplotlib", "3.11.2", MATPLOTLIB_LICENSE + PSF, "https://files.example/m.whl"),
        ("textonly", "1.0", MATPLOTLIB_LICENSE, "https://files.example/t.whl"),
        ("oneline", "1.0", "License: Lizenz f\u00fcr alle\n", "https://files.example/o.whl"),
    )
    stage = make_bundle(matrix, root, tmp_path, wheels=wheels, with_images=False)
    text = (stage / sbom.SBOM_NAME).read_text(encoding="utf-8")
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    by_name = {c["name"]: c for c in _walk(json.loads(text)["components"])}
    assert by_name["matplotlib"]["licenses"] == [
        {"license": {"id": "PSF-2.0", "acknowledgement": "declared"}}
    ]
    (licence,) = by_name["textonly"]["licenses"]
    assert licence["license"]["name"].startswith("License agreement for matplotlib")
    assert "Copyright \u00a9 2010-2022  Google, Inc." in licence["license"]["text"]["content"]
    assert by_name["oneline"]["licenses"][0]["license"]["name"] == "Lizenz f\u00fcr alle"
    subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"], cwd=stage, check=True)


def test_a_bundle_without_a_manifest_or_with_a_broken_wheel_is_named(tmp_path, built):
    with pytest.raises(sbom.SbomError, match="not a finished bundle"):
        sbom.sbom(tmp_path)
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(sbom.SbomError, match="broken-1.0-py3-none-any.whl: cannot read"):
        sbom.wheel_licenses(broken)
