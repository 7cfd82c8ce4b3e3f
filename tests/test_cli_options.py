"""Bad command-line values: refused up front, in one line, before anything exists.

Every command's options are driven through the real CLI in-process. A value
that cannot work must end the command with exit status 2 and exactly one line
``r2sweep: error: --option value: what is wrong and the fix``, with no
traceback, nothing created in the working directory (no mlflow.db, no results
folder, no output file) and no Ray started. The case ids start with the option
(``storage-file``, ``tracking-uri-ftp``, ...) so that the cases per option can
be counted.

An unreachable Ray cluster is not bad input: exit status 1, one line naming
the address, and in seconds instead of Ray's minutes of retries.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from test_bad_input import BASE  # the same valid sweep file: a case changes one option, not the file

from r2sweep.api import options as cli_options
from r2sweep.cli.app import main
from r2sweep.core import option_errors
from r2sweep.core.option_errors import OptionError
from r2sweep.tracking.uri import tracking_uri
from r2sweep.tune.ray_address import parse_ray_address

#: What every case finds in its working directory: the sweep file, a regular file, a folder.
FIXTURES = ["adir", "afile", "space.yaml"]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for variable in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    (tmp_path / "afile").write_text("not a folder, not a database\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


def _refused(work: Path, capsys: pytest.CaptureFixture, argv: list[str], status: int = 2) -> str:
    """Run the CLI; assert the status, one error line, no traceback, nothing created, no Ray; return the line.

    A sweep announces itself (``sweep NAME: 4 trials, ...``) only once its store and its
    cluster have answered, so a refusal, a bad value or an unreachable cluster, is the only line.
    """
    before = sorted(p.name for p in work.iterdir())
    assert not ray.is_initialized()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == status, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2sweep: error: "), err
    assert sorted(p.name for p in work.iterdir()) == before, "nothing may be created"
    assert list((work / "adir").iterdir()) == []
    assert not ray.is_initialized()
    return lines[0].removeprefix("r2sweep: error: ")


LONG = "x" * 300
SWEEP = ["sweep", "space.yaml"]

# (argv, the start of the error line: the option and the value as shown, a word of the fix)
CASES = {
    # sweep --storage
    "storage-empty": (SWEEP + ["--storage", ""], "--storage '': an empty path", "r2sweep_results"),
    "storage-file": (SWEEP + ["--storage", "afile"], "--storage afile: exists and is a file", "folder"),
    "storage-below-file": (SWEEP + ["--storage", "afile/results"], "--storage afile/results: ", "is a file"),
    "storage-scheme": (SWEEP + ["--storage", "foo://x"], "--storage foo://x: foo:// is not a file system", "s3://"),
    "storage-http": (SWEEP + ["--storage", "http://host/results"], "--storage http://host/results: http://", "s3://"),
    "storage-mock": (SWEEP + ["--storage", "mock://x"], "--storage mock://x: an in-memory", "lost"),
    "storage-no-bucket": (SWEEP + ["--storage", "s3://"], "--storage s3://: names no bucket", "s3://BUCKET"),
    "storage-relative-file-uri": (SWEEP + ["--storage", "file://results"], "--storage file://results: ", "absolute"),
    "storage-query": (SWEEP + ["--storage", "gs://bucket/x?foo=1"], "--storage 'gs://bucket/x?foo=1': ", "query"),
    "storage-too-long": (SWEEP + ["--storage", LONG], "--storage 'xxxxx", "300 bytes long"),
    # sweep --tracking-uri
    "tracking-uri-empty": (SWEEP + ["--tracking-uri", ""], "--tracking-uri '': an empty URI", "sqlite:///mlflow.db"),
    "tracking-uri-ftp": (SWEEP + ["--tracking-uri", "ftp://x"], "--tracking-uri ftp://x: 'ftp' is not a scheme", "http://"),
    "tracking-uri-no-scheme-server": (SWEEP + ["--tracking-uri", "localhost:5000"], "--tracking-uri localhost:5000: ",
                                      "http://localhost:5000"),
    "tracking-uri-postgres-alias": (SWEEP + ["--tracking-uri", "postgres://u@h/db"], "--tracking-uri postgres://u@h/db: ",
                                    "postgresql://"),
    "tracking-uri-sqlite-no-folder": (SWEEP + ["--tracking-uri", "sqlite:///nowhere/mlflow.db"],
                                      "--tracking-uri sqlite:///nowhere/mlflow.db: the folder", "does not exist"),
    "tracking-uri-sqlite-below-file": (SWEEP + ["--tracking-uri", "sqlite:///afile/mlflow.db"],
                                       "--tracking-uri sqlite:///afile/mlflow.db: ", "is a file"),
    "tracking-uri-sqlite-folder": (SWEEP + ["--tracking-uri", "sqlite:///adir"], "--tracking-uri sqlite:///adir: ",
                                   "adir/mlflow.db"),
    "tracking-uri-sqlite-not-a-db": (SWEEP + ["--tracking-uri", "sqlite:///afile"], "--tracking-uri sqlite:///afile: ",
                                     "not an SQLite database"),
    "tracking-uri-sqlite-memory": (SWEEP + ["--tracking-uri", "sqlite://"], "--tracking-uri sqlite://: names no file",
                                   "in-memory"),
    "tracking-uri-sqlite-no-slashes": (SWEEP + ["--tracking-uri", "sqlite:mlflow.db"], "--tracking-uri sqlite:mlflow.db: ",
                                       "sqlite:///FILE.db"),
    "tracking-uri-file-uri": (SWEEP + ["--tracking-uri", "file:///tmp/mlruns"], "--tracking-uri file:///tmp/mlruns: a file store",
                              "MLFLOW_ALLOW_FILE_STORE=true"),
    "tracking-uri-plain-path": (SWEEP + ["--tracking-uri", "./mlruns"], "--tracking-uri ./mlruns: a file store",
                                "MLFLOW_ALLOW_FILE_STORE=true"),
    "tracking-uri-http-no-host": (SWEEP + ["--tracking-uri", "http://"], "--tracking-uri http://: names no host", "HOST:PORT"),
    "tracking-uri-http-bad-port": (SWEEP + ["--tracking-uri", "http://host:99999"], "--tracking-uri http://host:99999: the port",
                                   "65535"),
    "tracking-uri-unknown-driver": (SWEEP + ["--tracking-uri", "postgresql+nosuchdriver://u@h/db"],
                                    "--tracking-uri postgresql+nosuchdriver://u@h/db: ", "SQLAlchemy"),
    "tracking-uri-password-hidden": (SWEEP + ["--tracking-uri", "ftp://user:secret@host"],
                                     "--tracking-uri 'ftp://user:***@host': ", "http://"),
    # sweep --name (and the file's name)
    "name-empty": (SWEEP + ["--name", ""], "--name '': an empty name", "--name r2-linf"),
    "name-spaces": (SWEEP + ["--name", "   "], "--name '   ': only spaces", "--name r2-linf"),
    "name-slash": (SWEEP + ["--name", "a/b"], "--name a/b: contains a folder separator", "'-' or '_'"),
    "name-colon": (SWEEP + ["--name", "a:b"], "--name a:b: contains ':'", "r2sweep-NAME"),
    "name-control": (SWEEP + ["--name", "a\nb"], "--name 'a\\nb': contains a control character", "letters"),
    "name-dotdot": (SWEEP + ["--name", ".."], "--name ..: names the storage folder", "--name r2-linf"),
    "name-too-long": (SWEEP + ["--name", "n" * 241], "--name 'nnnn", "241 bytes long"),
    "name-query-on-uri-storage": (SWEEP + ["--storage", "s3://bucket/r2sweep", "--name", "a?b"], "--name 'a?b': contains '?'",
                                  "query"),
    "name-in-file": (["sweep", "named.yaml"], "named.yaml: name='a:b' is not valid: contains ':'", "name: r2-linf"),
    # sweep --address (and RAY_ADDRESS)
    "address-not-a-port": (SWEEP + ["--address", "localhost:notaport"], "--address localhost:notaport: the port notaport",
                           "localhost:6379"),
    "address-ray-no-host": (SWEEP + ["--address", "ray://"], "--address ray://: names no host", "ray://HOST:10001"),
    "address-port-range": (SWEEP + ["--address", "host:99999"], "--address host:99999: the port 99999", "65535"),
    "address-http": (SWEEP + ["--address", "http://x:1"], "--address http://x:1: a web address", "HOST:6379"),
    "address-empty": (SWEEP + ["--address", ""], "--address '': an empty address", "local Ray"),
    "address-no-port": (SWEEP + ["--address", "headnode"], "--address headnode: names no port", "headnode:6379"),
    "address-scheme": (SWEEP + ["--address", "grpc://h:1"], "--address grpc://h:1: grpc:// is not a Ray address", "HOST:6379"),
    "address-bad-host": (SWEEP + ["--address", "a b:6379"], "--address 'a b:6379': 'a b' is not a host name", "HOST:6379"),
    "address-env": (SWEEP, "RAY_ADDRESS=host:99999: the port 99999", "65535"),
    # sweep --num-samples, --max-concurrent: the spec's own checks, as before
    "num-samples-zero": (SWEEP + ["--num-samples", "0"], "space.yaml: sweep.num_samples=0 is not valid", "integer >= 1"),
    "max-concurrent-negative": (SWEEP + ["--max-concurrent", "-1"], "space.yaml: sweep.max_concurrent=-1 is not valid",
                                "integer >= 1"),
    # trial --out
    "trial-out-file": (["trial", "space.yaml", "--out", "afile"], "--out afile: exists and is a file", "folder"),
    "trial-out-below-file": (["trial", "space.yaml", "--out", "afile/run"], "--out afile/run: ", "is a file"),
    "trial-out-empty": (["trial", "space.yaml", "--out", ""], "--out '': an empty path", "folder"),
    # best: --out, --tracking-uri, name
    "best-out-dir": (["best", "s", "--out", "adir"], "--out adir: is a folder", "adir/best.yaml"),
    "best-out-below-file": (["best", "s", "--out", "afile/best.yaml"], "--out afile/best.yaml: ", "is a file"),
    "best-out-trailing-slash": (["best", "s", "--out", "new/"], "--out new/: names a folder", "new/best.yaml"),
    "best-out-empty": (["best", "s", "--out", ""], "--out '': an empty path", "best.yaml"),
    "best-tracking-uri-ftp": (["best", "s", "--tracking-uri", "ftp://x"], "--tracking-uri ftp://x: ", "http://"),
    "best-tracking-uri-env": (["best", "s"], "MLFLOW_TRACKING_URI=ftp://x: 'ftp' is not a scheme", "http://"),
    "best-name-empty": (["best", ""], "sweep name '': an empty name", "tracking store"),
    "best-name-colon": (["best", "a:b"], "sweep name a:b: MLflow refuses", "--no-register"),
    # report --out
    "report-out-file": (["report", "s", "--out", "afile"], "--out afile: exists and is a file", "folder"),
    "report-out-below-file": (["report", "s", "--out", "afile/report"], "--out afile/report: ", "is a file"),
    "report-tracking-uri-ftp": (["report", "s", "--out", "r", "--tracking-uri", "ftp://x"], "--tracking-uri ftp://x: ", "http://"),
    # confirm: --out, --top, --seeds, --address
    "confirm-out-dir": (["confirm", "s", "--out", "adir"], "--out adir: is a folder", "adir/s-confirmed.yaml"),
    "confirm-out-below-file": (["confirm", "s", "--out", "afile/c.yaml"], "--out afile/c.yaml: ", "is a file"),
    "confirm-top-zero": (["confirm", "s", "--top", "0"], "--top 0: must be at least 1", "re-run"),
    "confirm-seeds-negative": (["confirm", "s", "--seeds", "1", "-1"], "--seeds 1 -1: seed -1 is outside", "--seeds 1 2 3"),
    "confirm-seeds-duplicate": (["confirm", "s", "--seeds", "1", "2", "1"], "--seeds 1 2 1: seed 1 is given twice",
                                "distinct"),
    "confirm-seeds-too-big": (["confirm", "s", "--seeds", str(2**32)], f"--seeds {2**32}: seed {2**32} is outside", "NumPy"),
    "confirm-address-malformed": (["confirm", "s", "--address", "host:99999"], "--address host:99999: the port", "65535"),
    "confirm-tracking-uri-sqlite-no-folder": (["confirm", "s", "--tracking-uri", "sqlite:///nowhere/m.db"],
                                              "--tracking-uri sqlite:///nowhere/m.db: ", "does not exist"),
    # compare: --by, --metric, names
    "compare-by-empty": (["compare", "s", "--by", ""], "--by '': an empty name", "r2.kind"),
    "compare-metric-empty": (["compare", "s", "--metric", " "], "--metric ' ': an empty name", "top1"),
    "compare-name-empty": (["compare", "s", ""], "sweep name '': an empty name", "tracking store"),
    "compare-tracking-uri-http-no-host": (["compare", "s", "--tracking-uri", "https://:443"], "--tracking-uri https://:443: ",
                                          "names no host"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_value_is_refused_in_one_line_before_anything_exists(case: str, work: Path, capsys, monkeypatch) -> None:
    argv, start, fix = CASES[case]
    if case == "address-env":
        monkeypatch.setenv("RAY_ADDRESS", "host:99999")
    if case == "best-tracking-uri-env":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://x")
    if case == "name-in-file":
        (work / "named.yaml").write_text(yaml.safe_dump({**BASE, "name": "a:b"}, sort_keys=False))
    line = _refused(work, capsys, argv)
    assert line.startswith(start), line
    assert fix in line, line
    assert "secret" not in line


def test_cases_cover_every_option() -> None:
    options = {case.split("-")[0] for case in CASES}
    assert {"storage", "tracking", "name", "address", "num", "max", "trial", "best", "report", "confirm", "compare"} <= options


def test_a_folder_that_is_not_writable_is_refused(work: Path, capsys, monkeypatch) -> None:
    # Root writes anywhere, so the permission is faked for the one folder.
    access = option_errors.os.access
    monkeypatch.setattr(option_errors.os, "access", lambda path, mode: Path(path).name != "adir" and access(path, mode))
    line = _refused(work, capsys, SWEEP + ["--storage", "adir"])
    assert line.startswith("--storage adir: ") and "is not writable" in line, line


def test_ray_client_without_its_package_is_refused(work: Path, capsys, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(cli_options.importlib.util, "find_spec", lambda name: None if name == "grpc" else find_spec(name))
    line = _refused(work, capsys, SWEEP + ["--address", "ray://127.0.0.1:10001"])
    assert line.startswith("--address ray://127.0.0.1:10001: ray:// needs the Ray Client") and "ray[client]" in line, line


def test_a_file_store_passes_where_mlflow_allows_it(work: Path) -> None:
    # The refusal of file stores follows MLflow's switch instead of hard-coding it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert tracking_uri("./mlruns", env=None) == "./mlruns"
    with pytest.raises(OptionError, match="MLFLOW_ALLOW_FILE_STORE"):
        tracking_uri("./mlruns", env=None)


@pytest.mark.parametrize(
    "value",
    ["sqlite:///mlflow.db", "sqlite:///adir/m.db", "http://127.0.0.1:5000", "https://mlflow.example.org",
     "postgresql+psycopg://u:p@h/db", "databricks"],
)
def test_a_usable_tracking_uri_passes(value: str, work: Path) -> None:
    if value.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:
        with pytest.raises(OptionError, match="driver is not installed"):
            tracking_uri(value, env=None)
        return
    assert tracking_uri(value, env=None) == value
    assert sorted(p.name for p in work.iterdir()) == FIXTURES


@pytest.mark.parametrize(
    "value", ["results", "adir", "adir/new/deeper", "s3://bucket/r2sweep", "gs://bucket/x", "file:///tmp/r2sweep-results"]
)
def test_a_usable_storage_passes(value: str, work: Path) -> None:
    assert cli_options.storage(value) == value
    assert sorted(p.name for p in work.iterdir()) == FIXTURES


@pytest.mark.parametrize("value", ["auto", "local", "10.0.0.5:6379", "head-node.example:6379", "[::1]:6379",
                                   "ray://head:10001", "ray://head"])
def test_a_well_formed_ray_address_parses(value: str) -> None:
    address = parse_ray_address(value)
    assert address.kind in ("auto", "local", "gcs", "client")
    if value == "ray://head":
        assert address.port == 10001  # Ray Client's default port


# -- an unreachable cluster: exit 1, in seconds --------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sweep_imports() -> None:
    """Import what `r2sweep sweep` imports, so that the timings below measure the refusal, not imports."""
    import r2sweep.analysis.select  # noqa: F401
    import r2sweep.tracking.store  # noqa: F401
    import r2sweep.tune.callbacks  # noqa: F401
    import r2sweep.tune.tuner  # noqa: F401


def _unreachable(work: Path, capsys, argv: list[str], address: str) -> str:
    started = time.monotonic()
    line = _refused(work, capsys, argv, status=1)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert address in line, line
    print(f"{' '.join(argv)}: refused in {elapsed:.1f} s", file=sys.__stderr__)
    return line


def test_an_address_nobody_listens_on_fails_fast(work: Path, capsys, sweep_imports) -> None:
    address = f"127.0.0.1:{_free_port()}"
    line = _unreachable(work, capsys, SWEEP + ["--address", address], address)
    assert line.startswith(f"Ray cluster at {address}: nothing accepts connections there"), line
    assert "ray start --head" in line and "6379" in line and "10001" in line


def test_a_ray_client_address_nobody_listens_on_fails_fast(work: Path, capsys, monkeypatch, sweep_imports) -> None:
    # As if ray[client] were installed (it is not always): the probe runs before Ray is asked.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(cli_options.importlib.util, "find_spec", lambda name: object() if name == "grpc" else find_spec(name))
    address = f"ray://127.0.0.1:{_free_port()}"
    line = _unreachable(work, capsys, SWEEP + ["--address", address], address)
    assert "nothing accepts connections there" in line and "Ray Client port (10001" in line, line


def test_a_host_that_does_not_resolve_fails_fast(work: Path, capsys, sweep_imports) -> None:
    line = _unreachable(work, capsys, SWEEP + ["--address", "no-such-host.invalid:6379"], "no-such-host.invalid:6379")
    assert "cannot resolve the host 'no-such-host.invalid'" in line, line


def test_ray_address_from_the_environment_is_probed_too(work: Path, capsys, monkeypatch, sweep_imports) -> None:
    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    _unreachable(work, capsys, SWEEP, address)


def test_something_that_is_no_ray_head_fails_fast(work: Path, capsys, sweep_imports) -> None:
    # A port that accepts connections but never speaks gRPC: Ray would retry it for minutes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        line = _unreachable(work, capsys, SWEEP + ["--address", address], address)
    assert "accepts connections at 127.0.0.1 but sends nothing back" in line, line


def test_auto_without_a_cluster_is_one_clear_line(work: Path, capsys, monkeypatch, sweep_imports) -> None:
    # Other Ray instances may run on this machine (auto would join them): hide them from the lookup.
    import ray._private.services as services

    def no_gcs() -> list:
        return []

    no_gcs.cache_clear = lambda: None  # ray.shutdown calls it
    monkeypatch.setattr(services, "find_gcs_addresses", no_gcs)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    line = _unreachable(work, capsys, SWEEP + ["--address", "auto"], "auto")
    assert line.startswith("Ray address auto: no running Ray cluster found"), line
    assert "ray start --head" in line


def test_confirm_maps_an_unreachable_cluster_to_status_1(work: Path, capsys, monkeypatch, sweep_imports) -> None:
    # confirm joins Ray only once it has read the sweep: its store is faked, the join is real.
    import r2sweep.analysis.confirm
    import r2sweep.api.readers
    from r2sweep.tune.cluster import connect

    def confirm_top(tracker, name, *, address=None, **_):
        connect(address, None)
        raise AssertionError("connect should have failed")

    monkeypatch.setattr(r2sweep.api.readers, "open_store", lambda uri, option=None: object())
    monkeypatch.setattr(r2sweep.analysis.confirm, "confirm_top", confirm_top)
    address = f"127.0.0.1:{_free_port()}"
    _unreachable(work, capsys, ["confirm", "s", "--address", address], address)
