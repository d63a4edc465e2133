"""Config files: where they live, ``--config=`` specs, command-line overrides, one-screen descriptions, and
:func:`load_config` (what ``--config=`` does, from Python: tests and notebooks).

The ``configs/`` folder of the source tree is installed as the package ``mmfm_jax.configs`` (``setup.py``), so a
spec resolves the same from a checkout and from a wheel: ``train.py:xl_mode``, ``configs/train.py:xl_mode`` (from
any directory) and ``path/to/my_config.py:variant`` (a file of your own; an existing path always wins).

Overrides ``--config.a.b=TEXT`` are parsed by the type of the value they replace (bool, int, float, str, tuple);
an unknown key or a value of the wrong type raises :class:`ConfigError` naming the key, with a "did you mean".
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from mmfm_jax.config_utils import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The shipped config files: ``mmfm_jax/configs`` in an installed wheel, ``<checkout>/configs`` otherwise."""
    installed = PACKAGE_DIR / "configs"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.name for p in config_dir().glob("*.py") if not p.name.startswith("_"))


def resolve_config_file(spec: str) -> tuple[Path, str]:
    """``'file.py[:variant]'`` -> (path, variant or ''). An existing path wins; otherwise ``configs/file.py`` and
    ``file.py`` name a shipped config. Raises ``ConfigError`` (with the shipped names) when nothing matches."""
    file, _, variant = str(spec).partition(":")
    path = Path(os.path.expanduser(file))
    if path.is_file():
        return path, variant
    name = Path(file).name if Path(file).parent.name in ("configs", "") else None
    if name is not None and (config_dir() / name).is_file():
        return config_dir() / name, variant
    shipped = shipped_configs()
    near = difflib.get_close_matches(Path(file).name, shipped, n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise ConfigError(f"--config={spec}: no such config file (shipped: {', '.join(shipped)}; or give a path to "
                      f"a .py file with get_config(arg)){hint}")


def import_config_module(path: Path) -> ModuleType:
    mod_spec = importlib.util.spec_from_file_location(f"_mmfm_config_{abs(hash(str(path)))}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"--config={path}: not a Python file")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def variants(module: ModuleType) -> list[str]:
    """A config module's variants: its ``VARIANTS`` if defined, else the list its unknown-variant error names."""
    if hasattr(module, "VARIANTS"):
        return list(module.VARIANTS)
    try:
        module.get_config("\0")
    except ValueError as e:
        m = re.search(r"\(([^()]*)\)\s*$", str(e))
        if m:
            return [v.strip() for v in m.group(1).split(",") if v.strip()]
    return []


def build_config(module: ModuleType, variant: str, spec: str) -> ml_collections.ConfigDict:
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as e:
        if "unknown variant" not in str(e):
            raise
        known = variants(module)
        near = difflib.get_close_matches(variant, known, n=1)
        raise ConfigError(f"--config={spec}: unknown variant {variant!r} (variants: {', '.join(known)})"
                          + (f"; did you mean {near[0]!r}?" if near else "")) from None


def _keys(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def _parent(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    *parents, leaf = key.split(".")
    node: Any = cfg
    for p in parents:
        node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        near = difflib.get_close_matches(key, _keys(cfg), n=1, cutoff=0.7)
        raise ConfigError(f"config.{key}: unknown key" + (f"; did you mean config.{near[0]}?" if near else ""))
    return node, leaf


def parse_value(text: str, current: Any, key: str) -> Any:
    """Command-line text -> a value of ``current``'s type (``ConfigError`` naming ``config.<key>`` if impossible)."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"config.{key} = {text!r}: {what}")

    if isinstance(current, ml_collections.ConfigDict):
        raise bad(f"is a group of keys ({', '.join(current.keys())}); set config.{key}.<key>=...")
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("must be True or False")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        if current is None:
            return text
        kind = {int: "an int", float: "a number"}.get(type(current), f"a {type(current).__name__}")
        raise bad(f"must be {kind} (like {current!r})") from None
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be an int (like {current!r})")
    elif isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number (like {current!r})")
        value = float(value)
    elif isinstance(current, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value


def set_override(cfg: ml_collections.ConfigDict, key: str, value: Any, from_text: bool = False) -> None:
    """``cfg.<key> = value`` (parsed from command-line text when ``from_text``); unknown keys and type mismatches
    raise ``ConfigError`` naming the key."""
    node, leaf = _parent(cfg, key)
    if from_text:
        value = parse_value(value, node[leaf], key)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{key} = {value!r}: {e}") from None


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:variant]`` (or a shipped ``train.py:tiny``) like ``--config=`` does (for tests and
    notebooks), then apply ``{'a.b': value}`` overrides; unknown keys raise ``ConfigError`` naming the key."""
    path, variant = resolve_config_file(spec)
    cfg = build_config(import_config_module(path), variant, spec)
    for key, value in (overrides or {}).items():
        set_override(cfg, key, value)
    cfg.lock()
    return cfg


def describe(cfg: ml_collections.ConfigDict, width: int = 110) -> list[str]:
    """One line per top-level key: ``name = value`` or ``name.{a, b, c}`` for a group."""
    lines = []
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            line = f"  {k}.{{{', '.join(v.keys())}}}"
        else:
            line = f"  {k} = {v!r}"
        lines.append(line if len(line) <= width else line[:width - 3] + "...")
    return lines
