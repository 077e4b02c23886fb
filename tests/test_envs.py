"""envs/*.yaml are valid conda environment specs and pin what pyproject.toml pins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

#: Keys of a conda environment file (`conda env create --file`).
ENV_KEYS = {"name", "channels", "dependencies", "variables", "prefix"}
#: A conda match spec as written in environment files: name, optional version (=, ==, >=, <, ...,
#: wildcards, comma-joined constraints), optional build string.
MATCH_SPEC = re.compile(r"^(?:[\w.-]+::)?[A-Za-z0-9_][\w.-]*(?:\s*(?:==|=|>=|<=|>|<|!=|~=)?\s*[\w.*+]+"
                        r"(?:\s*,\s*(?:==|>=|<=|>|<|!=)\s*[\w.*+]+)*(?:[= ][\w.*]+)?)?$")


def pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(sections) <= 1, "one pip section at most"
    return sections[0] if sections else []


def requirements(lines) -> dict[str, Requirement]:
    reqs = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in reqs, f"{req.name} listed twice"
        reqs[name] = req
    return reqs


def test_there_are_env_files():
    assert ENVS, "envs/*.yaml"
    rules = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    # The rules refer to envs/memctl.yaml (through common.smk's ENV).
    assert "envs/memctl.yaml" in rules


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_file_is_a_valid_conda_spec(path):
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict), "a mapping"
    assert set(env) <= ENV_KEYS, f"unknown keys {set(env) - ENV_KEYS}"
    channels = env.get("channels")
    assert isinstance(channels, list) and channels and all(isinstance(c, str) and c for c in channels)
    deps = env["dependencies"]
    assert isinstance(deps, list) and deps
    for dep in deps:
        if isinstance(dep, dict):
            assert list(dep) == ["pip"], f"only a pip section may be a mapping, got {dep}"
            assert isinstance(dep["pip"], list) and dep["pip"]
        else:
            assert isinstance(dep, str) and MATCH_SPEC.match(dep), f"not a conda match spec: {dep!r}"
    conda_names = {re.split(r"[\s=<>!~]", d, maxsplit=1)[0] for d in deps if isinstance(d, str)}
    pip = pip_section(env)
    if pip:
        assert "pip" in conda_names, "a pip section needs pip among the conda dependencies"
        for line in pip:
            assert isinstance(line, str)
            if line.startswith("-"):
                pytest.fail(f"{line!r}: pip options and relative paths break when Snakemake creates the env "
                            "from its copy under .snakemake/conda (use a post-deploy script)")
            try:
                Requirement(line)
            except InvalidRequirement as err:
                pytest.fail(f"invalid pip requirement {line!r}: {err}")
    # Python is pinned and satisfies pyproject's requires-python.
    (python,) = [d for d in deps if isinstance(d, str) and re.match(r"python\b", d) and not d.startswith("python-")]
    version = re.sub(r"^python\s*=*\s*", "", python).rstrip(".*")
    assert Version(version) in SpecifierSet(PYPROJECT["project"]["requires-python"]), python


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_match_pyproject(path):
    env = yaml.safe_load(path.read_text())
    wanted = requirements(PYPROJECT["project"]["dependencies"])
    have = requirements(pip_section(env))
    assert sorted(have) == sorted(wanted), (
        f"missing from {path.name}: {sorted(set(wanted) - set(have))}; "
        f"not in pyproject.toml: {sorted(set(have) - set(wanted))}"
    )
    for name, req in wanted.items():
        assert have[name].specifier == req.specifier, f"{name}: {have[name].specifier} vs pyproject {req.specifier}"
        assert have[name].extras == req.extras and have[name].marker == req.marker, name


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_installs_memctl_after_deployment(path):
    """The env has memctl's dependencies; its post-deploy script installs memctl itself."""
    script = path.with_name(path.stem + ".post-deploy.sh")
    assert script.is_file(), f"{script.name} missing"
    text = script.read_text()
    assert text.startswith("#!") and "pip install --no-deps" in text and "MEMCTL_SRC" in text


def test_optional_dependencies_are_valid_pins():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"test", "slurm"} <= set(extras)
    for lines in extras.values():
        requirements(lines)
    slurm = requirements(extras["slurm"])["snakemake-executor-plugin-slurm"]
    # Debian 12's SLURM 22.05 works with plugin 2.4-2.8; older ones read $USER, 3.x is untested.
    assert "2.4" in slurm.specifier and "2.8" in slurm.specifier and "2.3" not in slurm.specifier
    assert "3.0" not in slurm.specifier
