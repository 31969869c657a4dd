"""Configuration: one YAML file -> a validated, typed L{Config}.

``load_config`` is the one entry point: it parses, maps onto the model
(L{lbtwist.config.model}), runs the cross-field checks
(L{lbtwist.config.validate}) and either returns the config with its warnings
or raises L{ConfigError}, whose ``str()`` is one ``FILE:LINE: path: message``
line per problem, ready to print before exiting non-zero.
"""
from __future__ import annotations

import os
from typing import Any

import attrs

from lbtwist.config.loader import load, parse_duration, parse_size
from lbtwist.config.model import Config
from lbtwist.config.problems import ConfigError, Positions, Problem, sort_problems

# binds and validate import Twisted's endpoint machinery (most of a second on a
# loaded box): loaded on first use, so ``lbtwist status --check``, run by
# keepalived every second, only pays for the YAML loader.


def __getattr__(name: str) -> Any:
    if name == "parse_udp_bind":
        from lbtwist.config.binds import parse_udp_bind

        return parse_udp_bind
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Config",
    "ConfigError",
    "LoadedConfig",
    "Problem",
    "load_config",
    "load_config_text",
    "parse_duration",
    "parse_size",
    "parse_udp_bind",
]


@attrs.frozen
class LoadedConfig:
    config: Config
    warnings: list[Problem]
    #: key path -> line, for messages about this config later (reload, admin).
    positions: Positions
    #: Where it came from ("<config>" for text).
    source: str = "<config>"


def _read(path_or_text: str | os.PathLike[str], source_name: str | None) -> tuple[str, str]:
    """A str containing a newline is YAML text; any other str or a path is a file name."""
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return path_or_text, source_name or "<config>"
    path = os.fspath(path_or_text)
    name = source_name or path
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), name
    except OSError as e:
        raise ConfigError([Problem("error", "", f"cannot read the config file: {e.strerror or e}", name)]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem("error", "", f"the config file is not UTF-8 text: {e.reason}", name)]) from None


def load_config(
    path_or_text: str | os.PathLike[str],
    registry: Any = None,
    *,
    source_name: str | None = None,
) -> LoadedConfig:
    """Load and validate a config file (or YAML text). ``registry`` defaults to
    L{lbtwist.registry.Registry.default}. Raises L{ConfigError} listing every
    problem when there is at least one error. A str without a newline is a
    file name: config text already in hand (a worker's, a reload's) goes
    through L{load_config_text}, which never guesses."""
    text, source = _read(path_or_text, source_name)
    return load_config_text(text, registry, source_name=source)


def load_config_text(text: str, registry: Any = None, *, source_name: str = "<config>") -> LoadedConfig:
    """Load and validate config TEXT (YAML or one-line JSON), whatever its
    shape; ``source_name`` names it in messages. Same errors as
    L{load_config}."""
    source = source_name
    result = load(text, source)
    problems = list(result.problems)
    if result.config is not None:
        if registry is None:
            from lbtwist.registry import Registry

            try:
                registry = Registry.default()
            except Exception as e:  # PluginError, or a broken plugin module
                problems.append(Problem("error", "", f"cannot load plugins: {type(e).__name__}: {e}", source))
        from lbtwist.config.validate import validate

        # a value the loader rejected was replaced by a stand-in: do not judge it twice
        problems += validate(result.config, result.positions, registry, source=source, rejected=result.bad)
    if result.config is None or any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return LoadedConfig(
        result.config,
        sort_problems(p for p in problems if p.severity == "warning"),
        result.positions,
        source,
    )
