"""The strict YAML loader: a user file must mean one thing, or be refused in one line.

Each refusal case is a real file given to ``r2sweep sweep`` and ``r2sweep trial``:
exit 2, one ``r2sweep: error:`` line naming the problem and where it is, no
traceback, nothing created. Case ids are grouped by class: ``ambiguous-`` (YAML
that PyYAML accepts with a surprising or second meaning) and ``bytes-`` (bytes
that are not text the loader can read). The positive tests pin that valid
files keep exactly the meaning ``yaml.safe_load`` gives them.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import yaml

from r2sweep.cli.app import main
from r2sweep.core.config.overrides import parse_override
from r2sweep.core.config.strict_yaml import MAX_BYTES, MAX_NODES
from r2sweep.core.config.sweep import load_sweep_spec
from r2sweep.core.config.trial import load_trial_config, read_yaml
from r2sweep.core.errors import ConfigError

# A valid sweep file (tests/test_bad_input.py's BASE), written out so that line numbers are known.
BASE = """\
name: strict
data: {name: digits}
model: {name: small_cnn}
train:
  epochs: 2
  lr: 0.05
r2: {kind: linf, strength: 0.01}
downstream:
  - {method: ptq, algorithm: rtn, weight_bits: [4]}
objective: {metric: ptq_rtn_w4a8/top1, mode: max}
search:
  r2.kind: {choice: [none, linf]}
  r2.strength: {loguniform: [1.0e-3, 1.0], when: {r2.kind: [linf]}}
sweep:
  num_samples: 4
  max_concurrent: 2
"""
END = len(BASE.splitlines()) + 1  # the line a text appended to BASE starts on
DIRECTORY = object()


def sub(old: str, new: str) -> str:
    """BASE with ``old`` (which must occur once) replaced."""
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def _bomb(levels: int = 9) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return BASE + "\n".join(lines) + "\n"  # 10**levels values once expanded


# id -> (file content, fragments the one error line must contain: the problem, where, the fix)
CASES: dict[str, tuple[object, list[str]]] = {
    "ambiguous-duplicate-top-key": (BASE + "name: again\n", ["name='name'", "a key given once", "line 1, column 1", f"line {END}"]),
    "ambiguous-duplicate-nested-key": (sub("  lr: 0.05\n", "  lr: 0.05\n  lr: 0.5\n"), ["train.lr='lr'", "line 6", "line 7", "delete one"]),
    "ambiguous-duplicate-flow-key": (sub("{kind: linf, strength: 0.01}", "{kind: linf, strength: 0.01, kind: none}"),
                                     ["r2.kind='kind'", "line 7, column 6", "line 7, column 34"]),
    "ambiguous-duplicate-in-list-entry": (sub("weight_bits: [4]}", "weight_bits: [4], method: qat}"),
                                          ["downstream[0].method='method'", "line 9"]),
    "ambiguous-two-documents": (BASE + "---\nname: other\n", ["one YAML document", f"line {END}", "'---'"]),
    "ambiguous-empty-second-document": (BASE + "---\n", ["one YAML document", f"line {END}"]),
    "ambiguous-bool-yes": (BASE + "  baseline: yes\n", ["sweep.baseline='yes'", f"line {END}, column 13", "YAML 1.1 boolean word", "write true or false"]),
    "ambiguous-bool-NO-uppercase": (sub("name: strict", "name: NO"), ["name='NO'", "line 1, column 7", "quote the text"]),
    "ambiguous-bool-off": (sub("strength: 0.01}", "strength: 0.01, skip_first_last: off}"), ["r2.skip_first_last='off'", "line 7"]),
    "ambiguous-bool-y": (sub("weight_bits: [4]}", "weight_bits: [4], bn_fold: y}"), ["downstream[0].bn_fold='y'", "YAML 1.1 boolean word"]),
    "ambiguous-bool-odd-case": (BASE + "  baseline: tRuE\n", ["sweep.baseline='tRuE'", "YAML 1.1 boolean word"]),
    "ambiguous-sexagesimal": (sub("epochs: 2", "epochs: 1:30"), ["train.epochs='1:30'", "line 5, column 11", "base 60"]),
    "ambiguous-sexagesimal-float": (sub("lr: 0.05", "lr: 1:30.5"), ["train.lr='1:30.5'", "line 6", "base 60"]),
    "ambiguous-octal": (sub("epochs: 2", "epochs: 010"), ["train.epochs='010'", "line 5", "octal"]),
    "ambiguous-underscore-int": (sub("num_samples: 4", "num_samples: 1_000"), ["sweep.num_samples='1_000'", "plain decimal"]),
    "ambiguous-date": (sub("name: strict", "name: 2024-01-01"), ["name='2024-01-01'", "date", "quote it"]),
    "ambiguous-timestamp": (sub("name: strict", "name: 2024-01-01 10:00:00"), ["name='2024-01-01 10:00:00'", "date"]),
    "ambiguous-tag-binary": (sub("name: strict", "name: !!binary c3RyaWN0"), ["name='!!binary'", "line 1", "drop it"]),
    "ambiguous-tag-set": (sub("{choice: [none, linf]}", "{choice: !!set {none, linf}}"), ["search.r2.kind.choice='!!set'", "line 12"]),
    "ambiguous-tag-omap": (BASE + "  resources_per_trial: !!omap [{cpu: 1}]\n", ["sweep.resources_per_trial='!!omap'"]),
    "ambiguous-tag-python": (sub("name: strict", "name: !!python/object/apply:os.system [echo hi]"),
                             ["name='!!python/object/apply:os.system'", "not allowed"]),
    "ambiguous-tag-custom": (sub("name: strict", "name: !secret strict"), ["name='!secret'", "line 1, column 7"]),
    "ambiguous-tag-timestamp": (sub("name: strict", "name: !!timestamp 2024-01-01"), ["name='!!timestamp'"]),
    "ambiguous-tag-disagrees": (sub("epochs: 2", "epochs: !!int yes"), ["train.epochs='yes'", "drop the tag"]),
    "ambiguous-merge-key": (sub("train:\n  epochs: 2\n", "train:\n  <<: {epochs: 2}\n"), ["train.<<='<<'", "merge key", "line 5"]),
    "ambiguous-key-int": (sub("  epochs: 2\n", "  1: 2\n"), ["train.1='1'", "a text key", "line 5, column 3"]),
    "ambiguous-key-null": (BASE + "null: x\n", ["null='null'", "a text key", f"line {END}"]),
    "ambiguous-key-bool": (BASE + "true: x\n", ["true='true'", "a text key"]),
    "ambiguous-key-yes-bool": (BASE + "on: push\n", ["on='on'", "boolean"]),
    "ambiguous-key-list": (BASE + "[a, b]: x\n", ["a text key", f"line {END}"]),
    "ambiguous-alias-bomb": (_bomb(), [f"at most {MAX_NODES} values once aliases are expanded"]),
    "ambiguous-alias-self": (BASE + "loop: &l [*l]\n", ["loop[0]=", "an alias inside its own anchor"]),
    "ambiguous-alias-deep-chain": (BASE + "".join(f"c{i}: &c{i} [*c{i - 1}]\n" if i else "c0: &c0 [x]\n" for i in range(80)),
                                   ["c6", "at most 64 levels of nesting once aliases are expanded"]),
    "ambiguous-deep-flow-nesting": (sub("name: strict", "name: " + "[" * 100 + "]" * 100), ["at most 64 levels of nesting (line 1, column 71)"]),
    "ambiguous-huge-flow-nesting": (sub("name: strict", "name: " + "{a: " * 200_000), ["at most 64 levels of nesting (line 1"]),
    "ambiguous-deep-block-nesting": (BASE + "deep:\n" + "".join(" " * i + "-\n" for i in range(100)), ["at most 64 levels of nesting"]),
    "bytes-latin1": (sub("name: strict", "name: café").encode("latin-1"), ["byte 0xE9 at line 1, column 10", "save the file as UTF-8"]),
    "bytes-latin1-in-comment": (("# résumé\n" + BASE).encode("latin-1"), ["byte 0xE9 at line 1, column 4", "UTF-8"]),
    "bytes-truncated-utf8": (BASE.encode() + b"# \xe2\x82\n", [f"byte 0xE2 at line {END}, column 3"]),
    "bytes-random-binary": (b"\x89PNG\r\n" + random.Random(0).randbytes(4096), ["line 1, column 1", "UTF-8"]),
    "bytes-nul": (sub("lr: 0.05", "lr: 0.05\0").encode(), ["a NUL byte at line 6, column 11", "UTF-8 text"]),
    "bytes-utf16-bom": (BASE.encode("utf-16"), ["UTF-16/UTF-32 byte-order mark", "save it as UTF-8"]),
    "bytes-utf16-no-bom": (BASE.encode("utf-16-le"), ["a NUL byte at line 1, column 2", "UTF-16"]),
    "bytes-utf32": (BASE.encode("utf-32"), ["UTF-16/UTF-32 byte-order mark"]),
    "bytes-control-bell": (sub("name: strict", "name: str\x07ict"), ["U+0007 at line 1, column 10", "delete it"]),
    "bytes-control-escape": (BASE + "# \x1b[31mred\n", [f"U+001B at line {END}, column 3"]),
    "bytes-control-del": (sub("lr: 0.05", "lr: 0.05\x7f"), ["U+007F at line 6"]),
    "bytes-c1-next-line": (sub("name: strict", "name: str\x85ict"), ["U+0085 at line 1, column 10"]),
    "bytes-line-separator": (sub("name: strict", "name: str\u2028ict"), ["U+2028 at line 1, column 10"]),
    "bytes-directory": (DIRECTORY, ["a YAML file, not a directory"]),
    "bytes-too-large": (BASE + "#" * MAX_BYTES + "\n", [f"at most {MAX_BYTES} bytes"]),
}


def _refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
             command: str, content: object, *extra: str) -> str:
    """Run the CLI on ``content``; assert the one-line refusal that creates nothing; return the line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Should a case get past the loader, it fails here instead of starting Ray or training a model.
    for runner in ("r2sweep.tune.tuner", "r2sweep.core.trial"):
        monkeypatch.setitem(sys.modules, runner, None)
    path = tmp_path / "space.yaml"
    if content is DIRECTORY:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    args = [command, str(path), *extra] + (["--out", str(tmp_path / "out")] if command == "trial" else [])
    status = main(args)
    out, err = capsys.readouterr()
    assert status == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"r2sweep: error: {path}: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"], "nothing may be created"
    return lines[0]


def test_each_class_has_its_cases() -> None:
    ambiguous = [case for case in CASES if case.startswith("ambiguous-")]
    unreadable = [case for case in CASES if case.startswith("bytes-")]
    assert len(ambiguous) >= 12 and len(unreadable) >= 6 and len(ambiguous) + len(unreadable) == len(CASES)


@pytest.mark.parametrize("command", ["sweep", "trial"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_file_is_refused_in_one_line(case: str, command: str, tmp_path, monkeypatch, capsys) -> None:
    content, fragments = CASES[case]
    line = _refused(tmp_path, monkeypatch, capsys, command, content)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("sweep.baseline=yes", ["--set sweep.baseline='yes'", "write true or false"]),
        ("train.epochs=010", ["--set train.epochs='010'", "octal"]),
        ("search.r2.kind={choice: [none], choice: [linf]}", ["--set search.r2.kind.choice='choice'", "a key given once"]),
        ("name=2024-01-01", ["--set name='2024-01-01'", "quote it"]),
        ("train.lr=[0.1", ["--set train.lr='[0.1'", "a YAML value"]),
    ],
)
def test_a_set_value_gets_the_same_strictness(override: str, fragments: list[str], tmp_path, monkeypatch, capsys) -> None:
    line = _refused(tmp_path, monkeypatch, capsys, "sweep", BASE, "--set", override)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def _write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_the_base_file_is_valid_so_each_case_fails_for_its_own_reason(tmp_path: Path) -> None:
    raw = read_yaml(_write(tmp_path, BASE))
    assert raw == yaml.safe_load(BASE)
    assert load_sweep_spec(raw).name == "strict"


def test_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    raw = read_yaml(_write(tmp_path, "train: {lr: 1e-3, weight_decay: 5E-4}\nr2: {kind: linf, strength: .5e+1}\n"
                                      "x: [1.0e3, 2., .5, -1, 0x1F, .inf, ~, true]\n"))
    assert raw["train"] == {"lr": 0.001, "weight_decay": 0.0005} and isinstance(raw["train"]["lr"], float)
    assert raw["r2"]["strength"] == 5.0 and parse_override("r2.strength=-.5") == ("r2.strength", -0.5)
    assert raw["x"] == [1000.0, 2.0, 0.5, -1, 31, float("inf"), None, True]
    del raw["x"]
    assert load_trial_config(raw).train.lr == 0.001  # PyYAML's '1e-3' (a string) was refused as "a number"
    assert parse_override("train.lr=1e-3") == ("train.lr", 0.001)
    assert parse_override("sweep.baseline=true") == ("sweep.baseline", True)


def test_quoted_or_str_tagged_text_keeps_its_single_meaning(tmp_path: Path) -> None:
    raw = read_yaml(_write(tmp_path, "a: 'yes'\nb: \"1:30\"\nc: '2024-01-01'\nd: !!str no\ne: '010'\n'<<': x\n'1': z\n"))
    assert raw == {"a": "yes", "b": "1:30", "c": "2024-01-01", "d": "no", "e": "010", "<<": "x", "1": "z"}


def test_a_utf8_bom_file_loads(tmp_path: Path) -> None:
    assert read_yaml(_write(tmp_path, b"\xef\xbb\xbf" + BASE.encode())) == yaml.safe_load(BASE)


def test_anchors_and_aliases_load(tmp_path: Path) -> None:
    text = "common: &c {epochs: 2, lr: 0.05}\ntrain: *c\nbits: &b [2, 4]\ndownstream: [{weight_bits: *b}]\n"
    assert read_yaml(_write(tmp_path, text)) == yaml.safe_load(text)
    assert read_yaml(_write(tmp_path, text))["train"] == {"epochs": 2, "lr": 0.05}


def test_an_empty_file_is_none(tmp_path: Path) -> None:
    assert read_yaml(_write(tmp_path, "# only a comment\n")) is None


def test_refusals_name_the_dotted_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_yaml(_write(tmp_path, BASE + "  baseline: on\n"))
    assert caught.value.field == "sweep.baseline" and caught.value.value == "on"
    with pytest.raises(ConfigError) as caught:
        read_yaml(_write(tmp_path, b"name: \xff\n"))
    assert caught.value.field == "file" and caught.value.value == str(tmp_path / "ok.yaml")


SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_the_repo_has_search_spaces() -> None:
    assert len(SPACES) >= 6


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_the_repos_files_keep_their_meaning(path: Path) -> None:
    assert read_yaml(path) == yaml.safe_load(path.read_text())
