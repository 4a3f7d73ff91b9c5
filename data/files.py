"""Reading the JSON and YAML files Keel is handed: recipes, config.json, tokenizer and export
files, format specs, run files. One reader, so every file gets the same limits and the same
kind of error: one line naming the file and what is wrong, never a traceback.

What is refused, and why each is not left to the json / yaml modules:

- a file too large for what it holds (a 2 GB "config.json" is not one), read no further;
- a path that is a directory, a symlink loop, unreadable, or not UTF-8;
- duplicate keys: both modules keep the last one silently, so `seq_len: 256` written above a
  forgotten `seq_len: 2048` trains at 2048;
- NaN and Infinity in JSON: Python's json accepts them, no other JSON parser does;
- YAML aliases that expand past a size no Keel file needs (an "alias bomb": ten nested
  anchors of ten make 10^10 values out of a few hundred bytes; PyYAML shares them while
  loading, but anything that walks the result, a validator or an error message, does not);
- PyYAML's own mistakes in values (a date like 2024-13-45 is a ValueError there).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, Iterator

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from data.errors import KeelError

MIB = 1 << 20
# Larger than any such file needs: a recipe or spec is a few KiB, a config.json tens of KiB; a
# tokenizer.json of a 200k vocabulary is about 30 MiB.
MAX_BYTES = 16 * MIB
# values a YAML file may expand to through its aliases (a recipe holds about a hundred)
MAX_YAML_VALUES = 100_000
# how much of an offending value an error message quotes
QUOTE_CHARS = 80


def quote(value: Any) -> str:
    """repr(value), cut to a length an error message can carry."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + f"... ({len(text)} characters)"


def read_text(path: str | Path, *, what: str = "file", max_bytes: int = MAX_BYTES) -> str:
    """The file's UTF-8 text; a KeelError naming the file for anything that stops that."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise KeelError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise KeelError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        why = "a symlink loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise KeelError(f"{path}: cannot read the {what} ({why})") from None
    if len(data) > max_bytes:
        raise KeelError(f"{path}: {what} is larger than {max_bytes // MIB} MiB, far more than such a file holds; "
                        "is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeelError(f"{path}: {what} is not UTF-8 text (byte {exc.start}); is it the right file?") from None


# --------------------------------------------------------------------------- JSON


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value (write a number, or null)")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {quote(key)} appears twice in one object; keep one")
        out[key] = value
    return out


def parse_json(text: str, source: str, *, what: str = "file", expect: type | None = None,
               allow_constants: bool = False) -> Any:
    """Strict JSON: no NaN/Infinity (unless allowed: Keel's own metric records hold a NaN loss as
    json.dumps writes it), no duplicate keys; `expect` the top-level type."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_object,
                           parse_constant=float if allow_constants else _refuse_constant)
    except json.JSONDecodeError as exc:
        raise KeelError(f"{source}: {what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    except ValueError as exc:
        raise KeelError(f"{source}: {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise KeelError(f"{source}: {what} is not valid JSON: nested too deeply") from None
    return _expect(value, expect, source, what, "JSON object" if expect is dict else "JSON list")


def read_json(path: str | Path, *, what: str = "file", expect: type | None = None,
              max_bytes: int = MAX_BYTES) -> Any:
    return parse_json(read_text(path, what=what, max_bytes=max_bytes), str(path), what=what, expect=expect)


def read_json_lines(path: str | Path, *, what: str = "file", max_bytes: int = 1 << 30) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line is a KeelError naming it."""
    text = read_text(path, what=what, max_bytes=max_bytes)
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, parse_json(line, f"{path}:{number}", what="line", expect=dict)


def _expect(value: Any, expect: type | None, source: str, what: str, name: str) -> Any:
    if expect is not None and not isinstance(value, expect):
        raise KeelError(f"{source}: {what} must hold a {name}, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing (empty)"}.get(
        type(value), f"a {type(value).__name__}")


# --------------------------------------------------------------------------- YAML


class _Refused(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then a key of its own: overriding is what merge keys are for
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: construct_mapping says so
                    continue
                if first is not None:
                    raise _Refused(None, None, f"key {quote(key)} appears twice in one mapping (lines {first} and "
                                               f"{key_node.start_mark.line + 1}); the second would silently win, "
                                               "keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node, source: str) -> None:
    """Refuse a node graph whose aliases expand past MAX_YAML_VALUES values, or that contains itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise KeelError(f"{source}: not valid YAML: an alias refers to the value that contains it "
                            f"(line {node.start_mark.line + 1}); write the value out")
        active.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise KeelError(f"{source}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values (line "
                                f"{node.start_mark.line + 1}); no Keel file needs that many, write them out")
        active.discard(key)
        sizes[key] = total
        return total

    size(root)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = exc.problem or exc.context or "malformed"
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return " ".join(str(problem).split()) + where
    return " ".join(str(exc).split())


def parse_yaml(text: str, source: str, *, what: str = "file", expect: type | None = None,
               max_nesting: int = 100) -> Any:
    """YAML through the safe loader, with duplicate keys, alias bombs and deep nesting refused."""
    if flow_nesting(text) > max_nesting:
        raise KeelError(f"{source}: [ ] or {{ }} nest more than {max_nesting} levels deep; a {what} needs a "
                        "few (unbalanced brackets in a value? quote it)")
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            value = None
        else:
            _expanded_size(node, source)
            value = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise KeelError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    except ValueError as exc:  # PyYAML builds dates and numbers itself: `2024-13-45` is a ValueError there
        raise KeelError(f"{source}: not valid YAML: a value is not the date or number its form or tag says "
                        f"({' '.join(str(exc).split())}); quote it") from None
    except (RecursionError, TypeError, OverflowError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())
        raise KeelError(f"{source}: not valid YAML: {why}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return _expect(value, expect, source, what, "YAML mapping" if expect is dict else "YAML list")


def read_yaml(path: str | Path, *, what: str = "file", expect: type | None = None,
              max_bytes: int = MAX_BYTES) -> Any:
    return parse_yaml(read_text(path, what=what, max_bytes=max_bytes), str(path), what=what, expect=expect)


# PyYAML's scanner takes time quadratic in the nesting of [ ] and { } (2,000 levels: 3 s; 20,000:
# minutes), and no Keel file needs more than a handful of levels.
def flow_nesting(text: str) -> int:
    """How deep [ ] and { } nest in the text (brackets in quoted strings counted too)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest
