"""The models a site can be given, as data: `bundles/models.toml`, one `[[model]]` each.

A model is named once (its name is its bundle's name, `model-<name>`, and its folder on the
site), comes from a source (`huggingface` or `modelscope`), a repository at a revision (a branch
or tag, by default the source's default branch: `invoke lock --model` pins it to a commit), file
patterns (fnmatch, as `huggingface_hub`'s `allow_patterns`: one GGUF quantisation, or a
safetensors folder's files) and the GPUStack backend that serves it. This module only reads the
data; the source is asked in `stages/hub.py` or `stages/modelscope.py`.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpustack_offline.core.errors import ModelError
from gpustack_offline.core.tomlfile import read_toml

SCHEMA = 1
SOURCES = ("huggingface", "modelscope")
# A revision not given is the source's default branch (the Hugging Face hub's main, ModelScope's
# master: its client's DEFAULT_MODEL_REVISION).
DEFAULT_REVISIONS: Mapping[str, str] = {"huggingface": "main", "modelscope": "master"}
# A backend, as models.toml names it, and its spelling in GPUStack's catalog per release line
# (gpustack/schemas/models.py BackendEnum): None where that line has no such backend. 2.x has
# no llama-box (GGUF) backend; 0.x has no SGLang.
BACKENDS: Mapping[str, Mapping[str, str | None]] = {
    "llama-box": {"0": "llama-box", "2": None},
    "vllm": {"0": "vllm", "2": "vLLM"},
    "vox-box": {"0": "vox-box", "2": "VoxBox"},
    "ascend-mindie": {"0": "ascend-mindie", "2": "MindIE"},
    "sglang": {"0": None, "2": "SGLang"},
}
# Backends that load one file (the first part of a split GGUF), not a folder.
FILE_BACKENDS = frozenset({"llama-box"})
BUNDLE_PREFIX = "model-"  # a model's bundle id; cell ids start with "v"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_REPOSITORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SPLIT_GGUF = re.compile(r"(?P<stem>.+)-(?P<part>\d{5})-of-(?P<parts>\d{5})\.gguf")
_KEYS = {"name", "source", "repository", "revision", "files", "backend", "description",
         "categories"}  # fmt: skip
_REQUIRED = ("name", "source", "repository", "files", "backend")


@dataclass(frozen=True)
class Model:
    name: str
    source: str
    repository: str
    revision: str
    files: tuple[str, ...]  # fnmatch patterns over the repository's file paths
    backend: str
    description: str = ""
    categories: tuple[str, ...] = ("llm",)

    @property
    def bundle_id(self) -> str:
        return f"{BUNDLE_PREFIX}{self.name}"

    def inputs_digest(self) -> str:
        """What decides the lock: source, repository, revision and patterns (not the backend or
        the description, which only the catalog entry shows)."""
        values = [self.source, self.repository, self.revision, list(self.files)]
        return hashlib.sha256(json.dumps(values).encode()).hexdigest()

    def matches(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.files)

    def entry(self, paths: Iterable[str]) -> str:
        """What GPUStack's `local_path` names inside the model's folder: for llama-box the one
        GGUF file (the first part of a split one; an `mmproj-*` projector beside it is carried
        but not named), else "" (the folder itself). Several GGUF models are refused: llama-box
        serves one, and the catalog could only name one of them."""
        if self.backend not in FILE_BACKENDS:
            return ""
        ggufs = sorted(
            p
            for p in paths
            if p.endswith(".gguf") and not p.rsplit("/", 1)[-1].startswith("mmproj")
        )
        if not ggufs:
            raise ModelError(
                f"model {self.name}: backend {self.backend} loads a GGUF file, and the patterns "
                f"{list(self.files)} match none in {self.repository}. Fix: name the .gguf file "
                "(one quantisation) in its files"
            )
        stems = {m["stem"] if (m := _SPLIT_GGUF.fullmatch(p)) else p for p in ggufs}
        if len(stems) > 1:
            raise ModelError(
                f"model {self.name}: the patterns {list(self.files)} match {len(stems)} GGUF "
                f"models ({', '.join(sorted(stems))}); {self.backend} serves one. Fix: narrow "
                "the files to one quantisation, or declare one model per file"
            )
        return ggufs[0]


class Models:
    """The models of one `models.toml`, by name."""

    def __init__(self, data: Mapping[str, Any], source: str = "models.toml") -> None:
        self.source = source
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise ModelError(
                f"{source}: unknown schema {schema!r}; this gpustack-offline reads {SCHEMA}"
            )
        unknown_top = set(data) - {"schema", "model"}
        if unknown_top:
            raise ModelError(
                f"{source}: unknown keys {sorted(unknown_top)}; models are [[model]] tables"
            )
        self.models: dict[str, Model] = {}
        for number, entry in enumerate(data.get("model", []), start=1):
            model = _model(entry, f"{source}: [[model]] #{number}")
            if model.name in self.models:
                raise ModelError(f"{source}: two models are named {model.name!r}; names are unique")
            self.models[model.name] = model

    @classmethod
    def load(cls, path: Path) -> Models:
        return cls(read_toml(path, ModelError, missing=f"models file {path} not found"), str(path))

    @property
    def names(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise self._unknown(name) from None

    def select(self, patterns: Sequence[str]) -> list[Model]:
        """The models named by each pattern (a name or a glob); one that names none is refused."""
        chosen: dict[str, Model] = {}
        for pattern in patterns:
            found = [n for n in self.names if fnmatch.fnmatchcase(n, pattern)]
            if not found:
                raise self._unknown(pattern)
            chosen.update((n, self.models[n]) for n in found)
        return [chosen[n] for n in sorted(chosen)]

    def _unknown(self, name: str) -> ModelError:
        near = difflib.get_close_matches(name, self.names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        known = ", ".join(self.names) or "none"
        return ModelError(
            f"unknown model {name!r}: {self.source} declares no such [[model]]; {hint}known "
            f"models: {known}. Fix: give one of them, or add a [[model]] entry"
        )


def _model(entry: Any, where: str) -> Model:
    if not isinstance(entry, dict):
        raise ModelError(f"{where} is not a table")
    unknown = set(entry) - _KEYS
    missing = [k for k in _REQUIRED if k not in entry]
    if unknown or missing:
        raise ModelError(
            f"{where} has unknown keys {sorted(unknown)} or lacks {missing}; keys: "
            f"{', '.join(sorted(_KEYS))} ({', '.join(_REQUIRED)} required)"
        )
    name = _text(entry, "name", where)
    where = f"{where} ({name})"
    if not _NAME.fullmatch(name):
        raise ModelError(
            f"{where}: name {name!r} must be lowercase letters, digits, '.', '_' or '-' (at "
            "most 64): it names the bundle and the model's folder on the site"
        )
    source = _text(entry, "source", where)
    if source not in SOURCES:
        raise ModelError(f"{where}: source {source!r} is not one of {', '.join(SOURCES)}")
    repository = _text(entry, "repository", where)
    if not _REPOSITORY.fullmatch(repository):
        raise ModelError(f"{where}: repository {repository!r} is not OWNER/NAME")
    backend = _text(entry, "backend", where)
    if backend not in BACKENDS:
        raise ModelError(
            f"{where}: backend {backend!r} is not one of {', '.join(sorted(BACKENDS))}"
        )
    files = _texts(entry, "files", where)
    if not files:
        raise ModelError(f"{where}: files is empty; give the patterns of the files to carry")
    categories = _texts(entry, "categories", where) if "categories" in entry else ("llm",)
    return Model(
        name=name,
        source=source,
        repository=repository,
        revision=_text(entry, "revision", where)
        if "revision" in entry
        else DEFAULT_REVISIONS[source],
        files=files,
        backend=backend,
        description=_text(entry, "description", where) if "description" in entry else "",
        categories=categories,
    )


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise ModelError(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def _texts(entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = entry[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ModelError(f"{where}: {key} must be a list of non-empty strings, not {value!r}")
    return tuple(value)


def is_model_bundle(bundle_id: str) -> bool:
    """A model's bundle among the bundles of a dist folder (cell ids start with `v`)."""
    return bundle_id.startswith(BUNDLE_PREFIX)
