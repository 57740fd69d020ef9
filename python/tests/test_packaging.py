"""The package installed as users install it, with torch 2.13: ``pip install .`` into a fresh virtual
environment (pip's build isolation: setuptools, wheel and pybind11 from PyPI, the machine's CMake and
Ninja; setup.py builds the extension from scratch), and ``pip wheel .``, whose wheel installs into another
fresh environment. Both environments are made from Debian's /usr/bin/python3 (the interpreter the
extension is built for) without its site packages; torch 2.13 comes from this machine's disk."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import BUILD_DIR, SOURCE_DIR

PYTHON = "/usr/bin/python3"
TORCH = "2.13.0"
PINS = os.path.join(SOURCE_DIR, "python", "requirements-torch2.txt")

# Run in each environment, outside the source tree: the installed package with torch tensors both ways.
CHECK = """
import os, sys, torch, moedist
here = os.path.dirname(moedist.__file__)
assert here.startswith(sys.prefix), (here, sys.prefix)
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
for name in ("py.typed", "_moedist.pyi"):
    assert os.path.isfile(os.path.join(here, name)), name
with moedist.new_group("pip-%d" % os.getpid(), 0, 1)[0] as ep:
    x = torch.arange(32, dtype=torch.float32).reshape(4, 8).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.int32)
    w = torch.ones(4, 2) / 2
    d = moedist.npu_moe_distribute_dispatch(x, ids, ep.name, 1, 0, 2, expert_scales=w)
    y = moedist.npu_moe_distribute_combine(d[0], ids, d[2], d[4], w, ep.name, 1, 0, 2)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x), (y, x)
print("installed", moedist.__version__, "at", here, "with torch", torch.__version__)
"""


def run(cmd, cwd, timeout, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}: exit status {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def user_env(**extra):
    """The environment of a user's shell: nothing pointing at this build tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOEDIST_CMAKE_BUILD_DIR", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def fresh_venv(path):
    """A virtual environment of /usr/bin/python3 with torch 2.13 (from disk) and the pinned numpy."""
    run([PYTHON, "-m", "venv", str(path)], path.parent, 120)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run(pip + ["--no-index", "--no-deps", f"torch=={TORCH}"], path.parent, 600)  # never PyPI's CUDA build
    run(pip + ["-c", PINS, f"torch=={TORCH}", "numpy"], path.parent, 600)
    return path / "bin" / "python"


def source_copy(dest):
    """The source tree as a clean clone has it (no build trees), so that pip's in-tree build leaves nothing
    in the checkout."""
    top = {"build", ".git", ".gl", ".whl"}

    def ignore(directory, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if os.path.abspath(directory) == os.path.abspath(SOURCE_DIR):
            skip |= top & set(names)
        return skip

    shutil.copytree(SOURCE_DIR, dest, ignore=ignore, symlinks=True)
    return dest


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="needs Debian's /usr/bin/python3")
def test_pip_install_dot_into_a_fresh_venv_with_torch_2_builds_and_works(tmp_path):
    python = fresh_venv(tmp_path / "venv")
    src = source_copy(tmp_path / "src")
    run([str(python), "-m", "pip", "install", "--quiet", str(src)], tmp_path, 1800, user_env())
    out = run([str(python), "-c", CHECK], tmp_path, 120, user_env())
    assert f"at {tmp_path / 'venv'}" in out and "with torch 2.13.0" in out, out
    # Nothing of the system's site packages is visible: no Debian torch 1.13 behind the venv's.
    run([str(python), "-c", "import sys; assert not any('dist-packages' in p for p in sys.path), sys.path"], tmp_path, 60)


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="needs Debian's /usr/bin/python3")
def test_pip_wheel_gives_a_wheel_that_installs_into_another_venv(tmp_path):
    # The wheel's packaging is what is checked: setup.py builds the extension in the release tree
    # (MOEDIST_CMAKE_BUILD_DIR) rather than compiling it again; pip's build isolation is the same.
    builder = tmp_path / "builder"
    run([PYTHON, "-m", "venv", str(builder)], tmp_path, 120)
    src = source_copy(tmp_path / "src")
    run([str(builder / "bin" / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"),
         str(src)], tmp_path, 1800, user_env(MOEDIST_CMAKE_BUILD_DIR=BUILD_DIR))
    [wheel] = os.listdir(tmp_path / "wheels")
    assert wheel.startswith("moedist-") and wheel.endswith(".whl") and f"cp{sys.version_info[0]}{sys.version_info[1]}" in wheel
    names = zipfile.ZipFile(tmp_path / "wheels" / wheel).namelist()
    for member in ("moedist/__init__.py", "moedist/_groups.py", "moedist/py.typed", "moedist/_moedist.pyi"):
        assert member in names, names
    assert any(n.startswith("moedist/_moedist") and n.endswith(".so") for n in names), names
    python = fresh_venv(tmp_path / "elsewhere")
    run([str(python), "-m", "pip", "install", "--quiet", str(tmp_path / "wheels" / wheel)], tmp_path, 600, user_env())
    out = run([str(python), "-c", CHECK], tmp_path, 120, user_env())
    assert f"at {tmp_path / 'elsewhere'}" in out, out
