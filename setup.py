"""Builds moedist._moedist with the project's CMake (python/CMakeLists.txt) and packages python/moedist.

MOEDIST_CMAKE_BUILD_DIR names an existing CMake build tree to build the extension in (the tests use the
release tree, so that nothing is compiled twice); otherwise a tree under setuptools' build_temp is
configured with this interpreter."""
import glob
import hashlib
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # One CMake tree per interpreter: a tree configured for another Python (a venv since deleted)
        # would keep that interpreter in its cache.
        tag = hashlib.sha1(sys.executable.encode()).hexdigest()[:12]
        build_dir = os.environ.get("MOEDIST_CMAKE_BUILD_DIR") or os.path.join(os.path.abspath(self.build_temp), "cmake-" + tag)
        if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            subprocess.check_call(["cmake", "-S", HERE, "-B", build_dir, *generator, "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                                   # as the release preset: line tables, not full debug info (builds faster)
                                   "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG",
                                   f"-DPython3_EXECUTABLE={sys.executable}", "-DMOEDIST_BUILD_TESTS=OFF",
                                   "-DMOEDIST_BUILD_TOOLS=OFF"])
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "_moedist", "--parallel", str(os.cpu_count() or 1)])
        built = glob.glob(os.path.join(build_dir, "python", "moedist", "_moedist*.so"))
        if not built:
            raise RuntimeError(f"the CMake build in {build_dir} made no moedist extension: is pybind11 installed for "
                               f"{sys.executable}? (Debian: pybind11-dev python3-pybind11)")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)


setup(
    packages=["moedist"],
    package_dir={"": "python"},
    ext_modules=[Extension("moedist._moedist", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
