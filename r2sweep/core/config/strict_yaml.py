"""The strict YAML loader for user files and ``--set`` values: one text, one meaning.

PyYAML implements YAML 1.1, other tools (and the YAML 1.2 spec) read the same
text differently, and PyYAML itself is silent about some mistakes. A search
space decides what a sweep costs and means, so every construct whose meaning
is not unique is refused with a :class:`~r2sweep.core.errors.ConfigError` naming
the dotted key, the line and column, and the fix. Refused:

* duplicate mapping keys at any depth (PyYAML silently keeps the last);
* more than one YAML document in a file;
* any plain scalar that PyYAML reads as something other than text while YAML
  1.2 reads it as text: 1.1 booleans (``yes``/``no``/``on``/``off``, and
  ``y``/``n``/odd-case ``tRuE``, which other 1.1 readers take as booleans),
  sexagesimal ``1:30`` (PyYAML: 90), leading-zero ``010`` (PyYAML: octal 8),
  ``0b101``, ``1_000``, dates and timestamps (PyYAML: date objects), the merge
  key ``<<`` (a 1.1-only extension that silently overrides keys);
* tags other than ``!!str``/``!!seq``/``!!map``: ``!!binary``, ``!!set``,
  ``!!omap``, ``!!timestamp``, ``!!python/...``, ``!custom``; ``!!int``,
  ``!!float``, ``!!bool`` and ``!!null`` only where the value already means that;
* mapping keys that are not text (``1: x``, ``null: x``, ``true: x``, ``[a]: x``);
* alias bombs: more than :data:`MAX_NODES` values once aliases are expanded, an
  alias inside its own anchor, nesting deeper than :data:`MAX_DEPTH`;
* bytes that are not UTF-8 text (NUL bytes, UTF-16/32, latin-1, binary),
  control characters, and the YAML 1.1-only line breaks U+0085/U+2028/U+2029;
  files over :data:`MAX_BYTES`, directories, unreadable paths.

Accepted, one meaning each: ``true``/``false``, ``null``/``~``/empty, decimal
integers without leading zeros, ``0x`` hex, and floats written with a dot or an
exponent. Unlike PyYAML, ``1e-3``, ``5E-4``, ``1.0e3`` and ``-.5`` are floats
(PyYAML reads them as strings; a person means a number, and YAML 1.2 agrees).
Anchors and aliases stay; a UTF-8 byte-order mark is skipped.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from r2sweep.core.errors import ConfigError

__all__ = ["StrictLoader", "loads", "load_bytes", "load_file", "MAX_NODES", "MAX_DEPTH", "MAX_BYTES"]

MAX_NODES = 100_000  # the repo's largest file has ~150; a billion-laughs file needs 10**9
MAX_DEPTH = 64  # the repo's files nest 5 deep; see fetch_flow_collection_start for why a cap
MAX_BYTES = 1_000_000  # search spaces are a few kB; never read a multi-GB file into memory

_T = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, SEQ, MAP = (_T + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))
_AMBIGUOUS = "tag:r2sweep:ambiguous"  # a plain scalar refused by the check below (its reason is re-derived)
_CONFIRMING = {INT, FLOAT, BOOL, NULL}  # allowed as explicit tags only when they agree with the value
_ALLOWED = {ScalarNode: {STR} | _CONFIRMING, SequenceNode: {SEQ}, MappingNode: {MAP}}
_PYYAML_RESOLVERS = yaml.SafeLoader.yaml_implicit_resolvers  # YAML 1.1's reading, to compare against
# Booleans in YAML 1.1 that PyYAML leaves as text (y, n) or misses in odd case (yEs, tRuE).
_BOOL_WORD = re.compile(r"(?i:y|yes|n|no|on|off|true|false)$")
# PyYAML's reader refuses C0/C1 controls and non-characters; U+0085/2028/2029 are line breaks
# for PyYAML but ordinary characters in YAML 1.2, so they are refused too.
_UNPRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_WHY = {  # PyYAML's tag for a refused plain scalar -> why and what to write instead
    BOOL: "a YAML 1.1 boolean word (PyYAML reads it as true/false, YAML 1.2 as text): write true or false, or quote the text",
    INT: "a YAML 1.1 integer form (leading zero = octal, 0b, 1_000, 1:30 = base 60): write a plain decimal, or quote the text",
    FLOAT: "a YAML 1.1 number form (1_0.5, 1:30.5 = base 60): write a plain decimal like 90.5, or quote the text",
    _T + "timestamp": "a date/time (PyYAML reads it as a date object, YAML 1.2 as text): quote it",
    _T + "merge": "a merge key (<<), YAML 1.1 only and it silently overrides keys: write the keys out",
    STR: "a YAML 1.1 boolean word (other YAML 1.1 readers read it as true/false): write true or false, or quote the text",
}


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the schema above; :meth:`construct_document` checks the tree first."""

    yaml_implicit_resolvers: dict = {}  # own table (not SafeLoader's): filled by the calls below

    def __init__(self, stream: Any, source: str = "<string>", root: str = "") -> None:
        super().__init__(stream)
        self.source, self.root = source, root

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        # A plain scalar that is text to us but not to PyYAML (or to other 1.1 readers) has two meanings.
        if kind is ScalarNode and implicit[0] and tag == STR and (_pyyaml_tag(value) != STR or _BOOL_WORD.match(value)):
            return _AMBIGUOUS
        return tag

    # PyYAML's scanner is quadratic in flow depth ("[[[[..." of 1 MB would never end) and its
    # composer recursive: nesting is capped while scanning, long before either bites.
    def fetch_flow_collection_start(self, token_class: Any) -> None:
        self._cap_depth(self.flow_level)
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column: int) -> bool:
        self._cap_depth(len(self.indents))
        return super().add_indent(column)

    def _cap_depth(self, depth: int) -> None:
        if depth >= MAX_DEPTH:
            mark = self.get_mark()
            raise ConfigError("file", self.source, f"at most {MAX_DEPTH} levels of nesting "
                              f"(line {mark.line + 1}, column {mark.column + 1})")

    def construct_document(self, node: Node) -> Any:
        self._check(node, self.root, 0, set(), [0])
        return super().construct_document(node)

    def _check(self, node: Node, path: str, depth: int, ancestors: set, count: list) -> None:
        # A walk over the composed tree, expanding aliases, before anything is constructed.
        count[0] += 1
        if count[0] > MAX_NODES:
            self._refuse(path, "(aliases)", node, f"at most {MAX_NODES} values once aliases are expanded (an alias bomb?)")
        if id(node) in ancestors:  # legal in YAML, but a value that contains itself has no plain form
            self._refuse(path, "(alias)", node, "a finite value, not an alias inside its own anchor")
        if depth > MAX_DEPTH:  # the scanner caps the text's nesting; chains of aliases can nest further
            self._refuse(path, "(nesting)", node, f"at most {MAX_DEPTH} levels of nesting once aliases are expanded")
        if node.tag == _AMBIGUOUS:
            why = _WHY.get(_pyyaml_tag(node.value), "a plain value PyYAML reads specially: quote it")
            self._refuse(path, node.value, node, why)
        if node.tag not in _ALLOWED[type(node)]:
            short = node.tag.replace(_T, "!!")
            self._refuse(path, short, node, "plain YAML: text, numbers, true/false, null, lists and mappings; "
                         f"the tag {short} is not allowed: drop it (quote the value if it is text)")
        if node.tag in _CONFIRMING and super().resolve(ScalarNode, node.value, (True, False)) != node.tag:
            kind = node.tag[len(_T):]
            self._refuse(path, node.value, node, f"the tag !!{kind} only on a value that already reads as {kind}: drop the tag")
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self._check(item, f"{path}[{index}]", depth + 1, ancestors | {id(node)}, count)
        elif isinstance(node, MappingNode):
            seen: dict[str, str] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, ScalarNode) else "(a list or mapping)"
                where = f"{path}.{name}" if path else name
                self._check(key, where, depth + 1, ancestors | {id(node)}, count)
                if key.tag != STR:  # 1: x, null: x, true: x: keys are field names
                    self._refuse(where, name, key, "a text key; quote it if it is a name")
                mark = key.start_mark
                if name in seen:
                    self._refuse(where, name, key, f"a key given once; it is first at {seen[name]} and again here "
                                 "(PyYAML would silently keep the last): delete one")
                seen[name] = f"line {mark.line + 1}, column {mark.column + 1}"
                self._check(value, where, depth + 1, ancestors | {id(node)}, count)

    def _refuse(self, path: str, value: Any, node: Node, allowed: str) -> None:
        mark = node.start_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})"
        if path:
            raise ConfigError(path, value, allowed + at)
        raise ConfigError("file", self.source, f"{allowed}; found {value!r}{at}")


for _tag, _regexp, _first in [  # YAML 1.2's core schema, minus the forms listed as refused
    (BOOL, r"(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (NULL, r"(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (INT, r"(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (FLOAT, r"[-+]?(?:[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$",
     "-+.0123456789"),
    (FLOAT, r"(?:[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+."),
]:
    StrictLoader.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))


def _pyyaml_tag(value: str) -> str:
    """The tag PyYAML's SafeLoader gives a plain scalar."""
    for tag, regexp in _PYYAML_RESOLVERS.get(value[:1], []) + _PYYAML_RESOLVERS.get(None, []):
        if regexp.match(value):
            return tag
    return STR


def _line_column(text: str, index: int) -> str:
    line, column = text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)
    return f"line {line}, column {column}"


def loads(text: str, source: str = "<string>", root: str = "") -> Any:
    """Parse ``text`` strictly; errors name ``root`` + the dotted key, or ``file=source``.

    Raises:
        ConfigError: for every refusal listed in the module docstring, and for YAML syntax errors.
    """
    bad = _UNPRINTABLE.search(text)
    if bad:
        raise ConfigError("file", source, f"printable text; the unprintable character U+{ord(bad.group()):04X} at "
                          f"{_line_column(text, bad.start())} is not allowed: delete it (in a double-quoted string write an escape)")
    loader = StrictLoader(text, source, root)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        if isinstance(error, ComposerError) and "single document" in str(error.context):
            raise ConfigError("file", source, f"one YAML document; a second one starts at {where}: "
                              "delete the '---' line (one file per sweep)") from None
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError("file", source, f"valid YAML; {problem} at {where}") from None
    except RecursionError:  # a safety net: the depth caps above should make this unreachable
        raise ConfigError("file", source, f"at most {MAX_DEPTH} levels of nesting") from None
    finally:
        loader.dispose()


def load_bytes(data: bytes, source: str = "<bytes>") -> Any:
    """Decode ``data`` as UTF-8 (a leading byte-order mark is skipped) and :func:`loads` it."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError("file", source, "UTF-8 text; this file starts with a UTF-16/UTF-32 byte-order mark: save it as UTF-8")
    nul = data.find(b"\0")
    try:  # checked before the NUL byte so that its line/column are counted in characters
        text = data[: nul if nul >= 0 else len(data)].decode("utf-8-sig")
    except UnicodeDecodeError as error:
        prefix = data[: error.start].decode("utf-8-sig")  # valid up to the first bad byte
        raise ConfigError("file", source, f"UTF-8 text; the byte 0x{data[error.start]:02X} at "
                          f"{_line_column(prefix, len(prefix))} is not UTF-8 (latin-1? binary?): save the file as UTF-8") from None
    if nul >= 0:
        raise ConfigError("file", source, f"a text file; a NUL byte at {_line_column(text, len(text))} "
                          "(a binary file, or UTF-16 without a byte-order mark?): save it as UTF-8 text")
    return loads(text, source)


def load_file(path: str | Path) -> Any:
    """Read and strictly parse one YAML file; every problem is a one-line ConfigError ``file=path``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("file", str(path), "a YAML file, not a directory")
    if not path.is_file():
        raise ConfigError("file", str(path), "an existing YAML file")
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as error:
        raise ConfigError("file", str(path), f"a readable file ({error.strerror or error})") from None
    if len(data) > MAX_BYTES:
        raise ConfigError("file", str(path), f"a YAML file of at most {MAX_BYTES} bytes")
    return load_bytes(data, str(path))
