"""Getting the user's code onto every Ray worker: the sweep's runtime environment, and the check that it worked.

A sweep whose model or dataset comes from the user's own module needs that module
on every node that runs a trial. Installing it there by hand is what r2sweep
saves its users: a factory whose module lives in the working directory (the
usual case: a script beside ``my_nets.py`` or a ``my_pkg/`` folder) is shipped
with the job through Ray's ``py_modules``, and ``sweep.runtime_env`` adds the rest
(other folders, pip packages, environment variables). Before any trial starts,
:func:`check_imports` imports every factory on every node, so a module that did
not travel is one line naming the field, the node and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from packaging.requirements import InvalidRequirement, Requirement
from ray.runtime_env import RuntimeEnv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from r2sweep.core.config.sweep import SweepSpec
from r2sweep.core.errors import ConfigError
from r2sweep.core.factories import installed_roots, local_callables, module_source, resolve_reference
from r2sweep.core.locations import is_uri
from r2sweep.core.validate import check, reject_unknown

__all__ = ["runtime_env_for", "check_runtime_env", "check_imports", "shipped_callables"]


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_runtime_env(env: Mapping[str, Any], cwd: Path) -> None:
    """Refuse, before Ray starts, a ``sweep.runtime_env`` Ray would stall on or take only once it runs.

    A misspelled key made Ray wait for over a minute; a ``working_dir`` that does not exist,
    or a ``pip`` entry that is not a requirement, failed only after Ray had started (issue 42).
    Whether a well-formed pip requirement exists on the index is Ray's to find out.

    Raises:
        ConfigError: naming ``sweep.runtime_env.<key>`` and the fix.
    """
    known = sorted(name for name in RuntimeEnv.known_fields if not name.startswith("_"))
    reject_unknown(env, known, lambda key: f"sweep.runtime_env.{key}", "key")
    paths = [("working_dir", env["working_dir"])] if "working_dir" in env else []
    paths += [("py_modules", path) for path in env.get("py_modules", [])]
    for key, path in paths:
        if is_uri(path):
            continue
        local = cwd / path
        if not local.exists():
            raise ConfigError(f"sweep.runtime_env.{key}", path, "a folder or file that exists (a relative path is from "
                              "the working directory) or a URI")
        if key == "working_dir" and not local.is_dir():
            raise ConfigError("sweep.runtime_env.working_dir", path, "a folder, not a file")
    if "pip" in env:
        _check_pip(env["pip"], cwd)
    if "env_vars" in env:
        variables = env["env_vars"]
        ok = isinstance(variables, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in variables.items())
        check(ok, "sweep.runtime_env.env_vars", variables, "a mapping of names to strings, e.g. {OMP_NUM_THREADS: '1'}")


def _check_pip(pip: Any, cwd: Path) -> None:
    field = "sweep.runtime_env.pip"
    if isinstance(pip, str):  # a requirements file
        check((cwd / pip).is_file(), field, pip, "a list of requirements, or a requirements file that exists")
        return
    entries = pip.get("packages") if isinstance(pip, Mapping) else pip
    check(isinstance(entries, list) and all(isinstance(e, str) for e in entries), field, pip,
          "a list of requirements (['torchvision>=0.19', './my_pkg']) or {packages: [...]}")
    for entry in entries:
        if entry.startswith(("-", ".", "/")) or "://" in entry or entry.endswith((".whl", ".tar.gz", ".zip")):
            continue  # pip options, local paths and URLs: pip's to read
        try:
            Requirement(entry)
        except InvalidRequirement as error:
            why = str(error).splitlines()[0]
            raise ConfigError(field, entry, f"a pip requirement such as 'name>=1.0' ({why})") from None


def runtime_env_for(spec: SweepSpec, cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``sweep.runtime_env`` plus, in ``py_modules``, the module (or package folder) of every factory that
    lives under the working directory and is not already shipped by a ``working_dir`` that holds it.
    The caller checks ``sweep.runtime_env`` first (:func:`check_runtime_env`), before Ray starts."""
    env: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v) for k, v in spec.settings.runtime_env.items()}
    here = Path(cwd or os.getcwd()).resolve()
    working = env.get("working_dir")
    shipped_dir = Path(working).resolve() if isinstance(working, str) and not is_uri(working) else None
    modules: list[str] = list(env.get("py_modules", []))
    installed = installed_roots()
    for reference in spec.factory_references():
        source = module_source(reference)
        if source is None or not _under(source, here) or any(_under(source, root) for root in installed):
            continue  # a local callable (shipped by value), an installed package, or code outside the working dir
        if reference.split(".")[0].split(":")[0] == "r2sweep":
            continue  # the package itself is installed on every node
        if shipped_dir is not None and _under(source, shipped_dir):
            continue
        if str(source) not in modules:
            modules.append(str(source))
    if modules:
        env["py_modules"] = modules
    return env


def shipped_callables(spec: SweepSpec) -> dict[str, Any]:
    """The driver's local callables (given from Python, not importable by name) that the trials need."""
    return local_callables(spec.factory_references())


@ray.remote(num_cpus=0)
def _import_errors(references: Sequence[str]) -> dict[str, str]:
    errors = {}
    for reference in references:
        try:
            resolve_reference("factory", reference)
        except ConfigError as error:
            errors[reference] = error.allowed
    return errors


def _fields(spec: SweepSpec) -> Mapping[str, str]:
    fields = {}
    for field, reference in (("model.factory", spec.trial.model.factory), ("data.factory", spec.trial.data.factory)):
        if reference:
            fields[reference] = field
    for param in spec.params:
        if param.path in ("model.factory", "data.factory"):
            fields.update({str(v): param.path for v in param.values if v})
    return fields


def check_imports(spec: SweepSpec, nodes: Sequence[dict]) -> None:
    """Import every factory of ``spec`` on each of ``nodes`` (Ray's node records) through the job's runtime env.

    Raises:
        ConfigError: naming the field, the node and how to ship the code.
    """
    references = [r for r in spec.factory_references() if r not in shipped_callables(spec)]
    if not references or not nodes:
        return
    probes = {node["NodeID"]: _import_errors.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(references) for node in nodes}
    fields = _fields(spec)
    for node_id, errors in zip(probes, ray.get(list(probes.values()))):
        for reference, why in errors.items():
            source = module_source(reference)
            ship = f"sweep.runtime_env: {{py_modules: [{source}]}}" if source else "sweep.runtime_env (py_modules or pip)"
            raise ConfigError(fields.get(reference, "model.factory"), reference,
                              f"a factory every Ray node can import; on node {node_id[:8]} it fails ({why}). Install it "
                              f"there, run from the folder that holds it, or ship it with {ship}")
