"""YAML text -> the typed model of L{lbtwist.config.model}, with line numbers.

The loader is generic: it walks ``attrs.fields`` and the resolved type hints of
each class, so adding a key to the model is all it takes to make the key
loadable. It works on PyYAML's node graph (``yaml.compose``) rather than on
plain dicts because nodes keep their line, and every problem must name one.

It never stops at the first problem: a value that does not fit is reported,
replaced by the field's default (or a placeholder for a required field) and
its path remembered in L{LoadResult.bad}, so the cross-field checks can still
run on the rest without repeating the complaint.
"""
from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import attrs
import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lbtwist.config.model import Config, Duration, Size
from lbtwist.config.problems import Positions, Problem, index_path, key_path
from lbtwist.registry import suggest

_NULL_TAG = "tag:yaml.org,2002:null"
_PLAIN_KEY_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
}

# -- durations and sizes --------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|(b))?$", re.IGNORECASE)
_NUMBER = re.compile(r"^[-+]?(\d+(?:\.\d*)?|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """``"250ms"``, ``"1.5s"``, ``"1m"``, ``"2h"`` or ``0`` -> seconds.

    A bare non-zero number is refused: ``timeout: 30`` could mean seconds or
    milliseconds, and guessing wrong by 1000x is how outages start."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '250ms', '5s' or '1m', got {value!r}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        raise ValueError(f"duration {value!r} has no unit: write e.g. '{value}s' or '{value}ms'")
    if isinstance(value, str):
        text = value.strip()
        m = _DURATION.match(text)
        if m:
            return float(m[1]) * _DURATION_UNITS[m[2]]
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} is negative")
        if _NUMBER.match(text):
            if float(text) == 0:
                return 0.0
            raise ValueError(f"duration {value!r} has no unit: write e.g. '{text}s' or '{text}ms'")
    raise ValueError(
        f"expected a duration like '250ms', '5s', '1m' or '2h', got {_show(value)}"
    )


def parse_size(value: Any) -> int:
    """``512``, ``"64k"``/``"64KiB"``, ``"1m"``/``"1MiB"``, ``"1g"`` -> bytes (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512, '64k' or '1m', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value!r} is negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            unit = (m[2] or m[3] or "").lower()
            return int(float(m[1]) * _SIZE_UNITS[unit])
        if value.strip().startswith("-"):
            raise ValueError(f"size {value!r} is negative")
    raise ValueError(f"expected a size like 512, '64k', '1m' or '1g', got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"the integer {value!r}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


# -- the loader -----------------------------------------------------------------


@attrs.frozen
class LoadResult:
    """What L{load} found. ``config`` is None only when the file had no usable shape."""

    config: Config | None
    problems: list[Problem]
    #: key path -> 1-based line of its key (or list item) in the file.
    positions: Positions
    #: Paths whose value was rejected and replaced by a default or placeholder.
    bad: tuple[str, ...]


class _Invalid(Exception):
    """A leaf value does not fit its type; the message says why."""


_BAD: Any = object()


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "a duration like '250ms', '5s' or '1m'"
    if tp is Size:
        return "a size like 512, '64k' or '1m'"
    origin = get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict or attrs.has(tp):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        type(None): "nothing (null)",
    }.get(tp, getattr(tp, "__name__", str(tp)))


class _Loader:
    def __init__(self, source: str | None) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.positions: Positions = {"": 1}
        self.bad: list[str] = []
        self._constructor = SafeConstructor()
        self._hints: dict[type, dict[str, Any]] = {}

    # -- reporting

    def error(self, path: str, node: Node | int | None, message: str) -> None:
        if isinstance(node, Node):
            line: int | None = node.start_mark.line + 1
        else:
            line = node
        self.problems.append(Problem("error", path, message, self.source, line))

    def reject(self, path: str, node: Node, message: str) -> Any:
        self.error(path, node, message)
        self.bad.append(path)
        return _BAD

    # -- YAML values

    def construct(self, node: Node) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as e:
            raise _Invalid(str(e.problem or e)) from None

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        try:
            return _show(self.construct(node))
        except _Invalid:
            return f"a value tagged {node.tag}"

    @staticmethod
    def is_null(node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == _NULL_TAG

    def key_of(self, knode: Node, parent: str) -> str | None:
        """Mapping keys are taken as written: ``on:`` is the key 'on', not True."""
        if isinstance(knode, ScalarNode) and knode.tag in _PLAIN_KEY_TAGS:
            return knode.value
        self.error(parent, knode, f"keys must be plain strings, got {self.describe(knode)}")
        return None

    def pairs(self, node: MappingNode, path: str):
        """(key, path, key node, value node), reporting bad and duplicate keys."""
        try:
            self._constructor.flatten_mapping(node)  # YAML merge keys (<<: *base)
        except ConstructorError as e:
            self.error(path, e.problem_mark.line + 1 if e.problem_mark else node, str(e.problem))
            return
        seen: dict[str, int] = {}
        for knode, vnode in node.value:
            key = self.key_of(knode, path)
            if key is None:
                continue
            p = key_path(path, key)
            line = knode.start_mark.line + 1
            if key in seen:
                self.error(p, line, f"duplicate key {key!r} (first at line {seen[key]})")
                continue
            seen[key] = line
            yield key, p, knode, vnode

    # -- typed conversion

    def hints(self, cls: type) -> dict[str, Any]:
        if cls not in self._hints:
            self._hints[cls] = get_type_hints(cls)
        return self._hints[cls]

    def convert(self, tp: Any, node: Node, path: str) -> Any:
        """The value of ``node`` as ``tp``, or _BAD after reporting why not."""
        origin = get_origin(tp)
        if tp is Any:
            return self.any_value(node, path)
        if origin in (Union, types.UnionType):
            return self.union(tp, node, path)
        if origin is list:
            return self.sequence(get_args(tp)[0], node, path)
        if origin is dict:
            return self.mapping(get_args(tp)[1], node, path)
        if attrs.has(tp):
            return self.load_class(tp, node, path)
        if not isinstance(node, ScalarNode) or self.is_null(node):
            return self.reject(path, node, f"expected {_type_name(tp)}, got {self.describe(node)}")
        try:
            return self.leaf(tp, self.construct(node))
        except _Invalid as e:
            return self.reject(path, node, str(e))

    def leaf(self, tp: Any, value: Any) -> Any:
        if tp is Duration:
            try:
                return parse_duration(value)
            except ValueError as e:
                raise _Invalid(str(e)) from None
        if tp is Size:
            try:
                return parse_size(value)
            except ValueError as e:
                raise _Invalid(str(e)) from None
        if isinstance(tp, typing.NewType):
            return self.leaf(tp.__supertype__, value)
        if get_origin(tp) is Literal:
            allowed = get_args(tp)
            if any(type(value) is type(a) and value == a for a in allowed):
                return value
            hint = suggest(value, [a for a in allowed if isinstance(a, str)]) if isinstance(value, str) else ""
            raise _Invalid(
                f"expected one of {', '.join(repr(a) for a in allowed)}, got {_show(value)}{hint}"
            )
        if tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                raise _Invalid(f"expected a string, got {_show(value)} (quote it: \"{value}\")")
        elif tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        else:
            raise TypeError(f"lbtwist.config.loader: unsupported model type {tp!r}")
        raise _Invalid(f"expected {_type_name(tp)}, got {_show(value)}")

    def union(self, tp: Any, node: Node, path: str) -> Any:
        args = get_args(tp)
        if type(None) in args and self.is_null(node):
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return self.convert(arms[0], node, path)
        for arm in arms:
            mark = (len(self.problems), len(self.bad))
            value = self.convert(arm, node, path)
            if value is not _BAD and len(self.problems) == mark[0]:
                return value
            del self.problems[mark[0]:], self.bad[mark[1]:]
        return self.reject(path, node, f"expected {_type_name(tp)}, got {self.describe(node)}")

    def sequence(self, item_type: Any, node: Node, path: str) -> Any:
        if self.is_null(node):
            return []  # "backends:" with nothing under it
        if not isinstance(node, SequenceNode):
            return self.reject(path, node, f"expected a list, got {self.describe(node)}")
        out = []
        for i, item in enumerate(node.value):
            p = index_path(path, i)
            self.positions[p] = item.start_mark.line + 1
            value = self.convert(item_type, item, p)
            # keep indices stable so later paths still point at the right item
            out.append(self.placeholder(item_type) if value is _BAD else value)
        return out

    def mapping(self, value_type: Any, node: Node, path: str) -> Any:
        if self.is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            return self.reject(path, node, f"expected a mapping, got {self.describe(node)}")
        out = {}
        for key, p, knode, vnode in self.pairs(node, path):
            self.positions[p] = knode.start_mark.line + 1
            value = self.convert(value_type, vnode, p)
            if value is not _BAD:
                out[key] = value
        return out

    def any_value(self, node: Node, path: str) -> Any:
        """Plugin-owned data (algorithm options, match values): plain YAML,
        with the position of every nested key kept for the plugin's errors."""
        try:
            value = self.construct(node)
        except _Invalid as e:
            return self.reject(path, node, str(e))
        self.record(node, path, set())
        return value

    def record(self, node: Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # aliases may form cycles
            return
        seen.add(id(node))
        self.positions.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self.positions[index_path(path, i)] = item.start_mark.line + 1
                self.record(item, index_path(path, i), seen)
        elif isinstance(node, MappingNode):
            for knode, vnode in node.value:
                if isinstance(knode, ScalarNode):
                    p = key_path(path, str(knode.value))
                    self.positions[p] = knode.start_mark.line + 1
                    self.record(vnode, p, seen)

    def load_class(self, cls: type, node: Node, path: str) -> Any:
        fields = {f.name: f for f in attrs.fields(cls) if f.init}
        # an empty value ("health:" with nothing under it) is an empty mapping
        empty = self.is_null(node)
        if not empty and not isinstance(node, MappingNode):
            return self.reject(
                path, node,
                f"expected a mapping with keys {', '.join(fields)}, got {self.describe(node)}",
            )
        hints = self.hints(cls)
        kwargs: dict[str, Any] = {}
        given: set[str] = set()
        for key, p, knode, vnode in () if empty else self.pairs(node, path):  # type: ignore[arg-type]
            given.add(key)
            field = fields.get(key)
            if field is None:
                hint = suggest(key, fields)
                if not hint:
                    hint = f"; valid keys: {', '.join(fields)}"
                self.error(p, knode, f"unknown key {key!r}{hint}")
                continue
            self.positions[p] = knode.start_mark.line + 1
            value = self.convert(hints[key], vnode, p)
            if value is not _BAD:
                kwargs[field.alias or key] = value
        for name, field in fields.items():
            if (field.alias or name) in kwargs or field.default is not attrs.NOTHING:
                continue
            p = key_path(path, name)
            if name not in given:
                self.error(p, node, f"missing required key {name!r}")
                self.bad.append(p)
            kwargs[field.alias or name] = self.placeholder(hints[name])
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # attrs validators a model class may define
            return self.reject(path, node, str(e))

    def placeholder(self, tp: Any) -> Any:
        """A stand-in for a rejected required value, so loading can go on."""
        origin = get_origin(tp)
        if tp is Any or (origin in (Union, types.UnionType) and type(None) in get_args(tp)):
            return None
        if origin in (Union, types.UnionType):
            return self.placeholder(get_args(tp)[0])
        if origin is list:
            return []
        if origin is dict:
            return {}
        if origin is Literal:
            return get_args(tp)[0]
        if isinstance(tp, typing.NewType):
            return self.placeholder(tp.__supertype__)
        if attrs.has(tp):
            hints = self.hints(tp)
            return tp(**{
                (f.alias or f.name): self.placeholder(hints[f.name])
                for f in attrs.fields(tp)
                if f.init and f.default is attrs.NOTHING
            })
        return {str: "", int: 0, float: 0.0, bool: False}.get(tp)


def load(text: str, source: str | None = None) -> LoadResult:
    """Parse ``text`` into a L{Config}, collecting every problem."""
    ld = _Loader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            if e.context.startswith("while") and e.context_mark is not None:
                what = f"{what} ({e.context} at line {e.context_mark.line + 1})"
            else:  # "expected a single document in the stream", "but found another document"
                what = f"{e.context}, {e.problem}"
        ld.error("", mark.line + 1 if mark else None, f"YAML syntax error: {what}")
        return LoadResult(None, ld.problems, ld.positions, ())
    except yaml.YAMLError as e:
        ld.error("", None, f"YAML syntax error: {e}")
        return LoadResult(None, ld.problems, ld.positions, ())
    top_keys = ", ".join(f.name for f in attrs.fields(Config))
    if root is None:
        ld.error("", 1, f"the file is empty; expected a mapping with keys {top_keys}")
        return LoadResult(None, ld.problems, ld.positions, ())
    if not isinstance(root, MappingNode):
        ld.error("", root, f"the top level must be a mapping with keys {top_keys}, got {ld.describe(root)}")
        return LoadResult(None, ld.problems, ld.positions, ())
    config = ld.load_class(Config, root, "")
    return LoadResult(
        None if config is _BAD else config, ld.problems, ld.positions, tuple(ld.bad)
    )
