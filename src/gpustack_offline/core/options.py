"""Every option, declared once, resolved in one place.

Cascade, lowest first: defaults < `[tool.gpustack-offline]` in pyproject.toml <
`GPUSTACK_OFFLINE_<NAME>` environment variables < CLI flags. An unknown key in the pyproject table
or an unknown `GPUSTACK_OFFLINE_*` variable is an error, so a typo never silently does nothing.
The environment is passed in as a mapping so that the resolver is testable.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpustack_offline.core.errors import DEBUG_ENV, OptionError
from gpustack_offline.core.tomlfile import read_toml

TOOL_KEY = "gpustack-offline"
ENV_PREFIX = "GPUSTACK_OFFLINE_"
# Variables read where they are used, not options: registry credentials
# (stages/registry_auth.py) and the traceback switch (errors.DEBUG_ENV).
_OWN_PREFIXES = (f"{ENV_PREFIX}REGISTRY_AUTH_", DEBUG_ENV)


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "gpustack-offline")


@dataclasses.dataclass(frozen=True)
class Options:
    """Resolved options. Field names are the option names (`-` in pyproject, `_` here)."""

    matrix: str = "bundles/matrix.toml"
    overrides: str = "bundles/overrides.toml"
    locks_dir: str = "bundles/locks"
    dist_dir: str = "dist"
    cache_dir: str = dataclasses.field(default_factory=_default_cache)
    index_url: str = "https://pypi.org/simple"
    debian_mirror: str = "http://deb.debian.org/debian"
    # Empty: upstream's own choice, the faster of github.com and GPUStack's COS mirror. A site
    # mirror must answer upstream's paths, /gpustack/<repo>/releases/download/<version>/<asset>.
    tools_base_url: str = ""
    tools_locks_dir: str = "bundles/tools"
    egress_allowlist: str = "bundles/egress.toml"
    # docker cells: where docker.io images come from ("" = Docker Hub itself), and the pin files
    registry_mirror: str = ""
    images_pins_dir: str = "bundles/images"
    # GPUStack 2.x: upstream's runner list per version, written by `invoke lock`
    runners_dir: str = "bundles/runners"
    # models (bundles/models.toml) and their locks; the Hugging Face endpoint models are locked
    # and fetched from ("" = $HF_ENDPOINT, else https://huggingface.co) and ModelScope's ("" =
    # $MODELSCOPE_ENDPOINT, else $MODELSCOPE_DOMAIN, else https://www.modelscope.cn): a site
    # mirror answering the same paths works
    models: str = "bundles/models.toml"
    model_locks_dir: str = "bundles/locks/models"
    hf_endpoint: str = ""
    modelscope_endpoint: str = ""
    # signing: an exported secret key file ("" = unsigned) and the name of the environment
    # variable holding its passphrase ("" = none); verify_key: the public key `verify` checks with
    signing_key: str = ""
    signing_passphrase_env: str = ""
    verify_key: str = ""
    # transfer media: split each bundle tar into volumes of this size ("" = one tar), e.g. 4G
    split: str = ""
    # what is written beside dist/<cell>/: tar, volumes (streamed from the folder, no whole
    # tar: the bundle once on disk) or both; "" = the tar, plus volumes when split is given
    write: str = ""
    jobs: int = 4
    frozen: bool = False
    verify_timeout: int = 900
    progress: bool = True
    # downloads (core/downloads.py RetryPolicy): requests in all per file, the backoff doubled
    # from `download-backoff` seconds up to `download-max-sleep`, a server's Retry-After obeyed
    # up to `download-max-retry-after`; the read timeout is the longest silence in a body
    download_attempts: int = 6
    download_backoff: float = 1.0
    download_max_sleep: float = 30.0
    download_max_retry_after: float = 120.0
    download_connect_timeout: float = 15.0
    download_read_timeout: float = 60.0

    def path(self, name: str, root: Path) -> Path:
        """An option that names a path, resolved against the project root."""
        value = Path(str(getattr(self, name))).expanduser()
        return value if value.is_absolute() else root / value


_FIELDS = {f.name: f for f in dataclasses.fields(Options)}
# The least value of a numeric option, where there is one.
_MINIMUM: dict[str, float] = {
    "download_attempts": 1,
    "download_backoff": 0,
    "download_max_sleep": 0,
    "download_max_retry_after": 0,
    "download_connect_timeout": 0,
    "download_read_timeout": 0,
}


def _convert(name: str, value: Any, source: str) -> Any:
    converted = _converted(name, value, source)
    if name in _MINIMUM and converted < _MINIMUM[name]:
        raise OptionError(
            f"{source}: option {_toml_key(name)}={value!r} is too small (at least "
            f"{_MINIMUM[name]:g})"
        )
    return converted


def _converted(name: str, value: Any, source: str) -> Any:
    kind = type(getattr(Options(), name))
    shown = _toml_key(name)  # as users write it: dist-dir, not dist_dir
    if kind is bool:
        return _to_bool(value, shown, source)
    if kind is int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise OptionError(
                f"{source}: option {shown} must be a whole number, not {value!r}"
            ) from None
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{source}: option {shown} must be a number, not {value!r}") from None
    if not isinstance(value, str):
        raise OptionError(f"{source}: option {shown} must be a string, not {value!r}")
    return value


def _to_bool(value: Any, shown: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise OptionError(f"{source}: option {shown} must be true or false, not {value!r}")


def _unknown(key: str, source: str, spell: Callable[[str], str]) -> OptionError:
    """Name the key as the user wrote it, the nearest known spelling, and every known one."""
    known = sorted(spell(n) for n in _FIELDS)
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return OptionError(f"{source}: unknown option {key!r}; {hint}known options: {', '.join(known)}")


def _toml_key(name: str) -> str:
    return name.replace("_", "-")


def _env_key(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _cli_key(name: str) -> str:
    return "--" + _toml_key(name)


def from_pyproject(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    table = read_toml(path, OptionError).get("tool", {}).get(TOOL_KEY, {})
    source = f"{path} [tool.{TOOL_KEY}]"
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise _unknown(key, source, _toml_key)
        values[name] = _convert(name, value, source)
    return values


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for key, value in env.items():
        # registry credentials (registry.py) share the prefix but are not options
        if not key.startswith(ENV_PREFIX) or key.startswith(_OWN_PREFIXES):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            raise _unknown(key, "environment", _env_key)
        values[name] = _convert(name, value, f"environment {key}")
    return values


def resolve(
    root: Path,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Options:
    """Options for the project at `root`: defaults < pyproject < environment < CLI.

    CLI values of None mean "not given" and do not override.
    """
    values = from_pyproject(root / "pyproject.toml")
    values.update(from_env(os.environ if env is None else env))
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise _unknown(_cli_key(key), "command line", _cli_key)
        values[key] = _convert(key, value, "command line")
    return Options(**values)
