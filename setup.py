"""Build script: the pure-Python package, plus the CUDA extension ``flix_kernels._C`` (csrc/,
built with CMake and ninja) when nvcc is found.

Environment:
  FLIX_CUDA=1        build the extension; fail if nvcc is missing or the build fails (also on a
                     machine without a GPU: build machines, CI)
  FLIX_CUDA=0        do not build it (the "cuda" backend is then unavailable)
  (unset)            build it when nvcc is found and an NVIDIA GPU driver is present; otherwise,
                     or if the build fails, install the pure-Python package and say so once
                     (a CPU-only machine that happens to have nvcc installs in seconds, not minutes)
  FLIX_CUDA_ARCHS    CMake CUDA architectures, e.g. "90" or "80-real;90" (default "80-real;89-real;90")
  CUDACXX            the nvcc to use (else PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin)

The outcome is written to flix_kernels/_build.json, which ``flix-kernels info`` reports.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STANDARD_NVCC = ("/usr/local/cuda/bin/nvcc",)
DEFAULT_ARCHS = "80-real;89-real;90"


def find_nvcc(env=os.environ, which=shutil.which, standard=STANDARD_NVCC) -> str | None:
    """The nvcc to build with, or None."""
    candidates = [env.get("CUDACXX"), which("nvcc")]
    candidates += [os.path.join(env[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if env.get(v)]
    candidates += list(standard)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def gpu_driver_present(which=shutil.which) -> bool:
    """Whether an NVIDIA driver is installed here: its kernel module reports a version, or
    ``nvidia-smi`` runs (WSL and containers that expose the GPU without /proc/driver)."""
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    smi = which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cuda_build_plan(env=os.environ, which=shutil.which, standard=STANDARD_NVCC,
                    has_driver=gpu_driver_present) -> tuple[bool, str, str | None]:
    """``(build, reason_if_not, nvcc)`` from FLIX_CUDA, the toolkit found and the GPU driver;
    raises SystemExit for FLIX_CUDA=1 without nvcc, or a FLIX_CUDA value that is not 0, 1 or
    empty. ``has_driver()`` is only asked when FLIX_CUDA is unset and nvcc was found."""
    mode = env.get("FLIX_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FLIX_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return False, "not built: disabled at install time (FLIX_CUDA=0)", None
    nvcc = find_nvcc(env, which, standard)
    if nvcc is None:
        if mode == "1":
            raise SystemExit(
                "FLIX_CUDA=1 asks for the CUDA extension, but no nvcc was found (looked at $CUDACXX, PATH, "
                "$CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin). Install the CUDA toolkit, point CUDACXX at "
                "nvcc, or unset FLIX_CUDA to install without the CUDA backend.")
        return False, "not built: no nvcc was found at install time (install the CUDA toolkit and reinstall)", None
    if mode == "" and not has_driver():
        return False, ("not built: no NVIDIA GPU driver at install time, so the kernels could not run here "
                       "(reinstall with FLIX_CUDA=1 to build them anyway)"), None
    return True, "", nvcc


def cuda_archs(env=os.environ) -> str:
    """FLIX_CUDA_ARCHS as a CMake list (commas or spaces accepted as separators)."""
    raw = env.get("FLIX_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    return ";".join(a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a)


def _tool(name: str) -> str | None:
    path = shutil.which(name)
    if path is None and name in ("cmake", "ninja"):
        try:  # the PyPI wheels (build requirements) keep their binaries in the package
            module = __import__(name)
            cand = os.path.join(getattr(module, "BIN_DIR", getattr(module, "CMAKE_BIN_DIR", "")), name)
            path = cand if os.path.isfile(cand) else None
        except ImportError:
            pass
    return path


if __name__ == "__main__":
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    class CMakeBuild(build_ext):
        """Builds flix_kernels._C with CMake (and ninja when present), or records why it did not."""

        def build_extension(self, ext):
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            build, reason, nvcc = cuda_build_plan()
            forced = os.environ.get("FLIX_CUDA", "").strip() == "1"
            status = {"cuda_extension": "skipped", "reason": reason, "archs": cuda_archs(), "nvcc": nvcc,
                      "requested": os.environ.get("FLIX_CUDA", "").strip() or "auto"}
            if build:
                try:
                    self._cmake(target, nvcc)
                    status.update(cuda_extension="built", reason="")
                except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
                    if forced:
                        raise
                    status.update(cuda_extension="failed", reason=f"not built: the CUDA build failed ({exc}); "
                                  "reinstall with FLIX_CUDA=1 and pip -v to see the compiler output")
            if status["cuda_extension"] != "built":
                target.unlink(missing_ok=True)  # a library left by an earlier build would contradict the status
                print(f"flix_kernels: the CUDA backend is off: {status['reason']}", file=sys.stderr)
            # Beside the built library, and in the source package for editable installs (setuptools
            # copies the library there, not other files).
            for folder in {target.parent, ROOT / "flix_kernels"}:
                try:
                    tmp = folder / "_build.json.tmp"
                    tmp.write_text(json.dumps(status, indent=1))
                    os.replace(tmp, folder / "_build.json")
                except OSError:
                    pass

        def copy_extensions_to_source(self):
            """Editable installs copy the built library into the source tree; with no library (skipped
            or failed build) there is nothing to copy, and a stale copy there must go too."""
            kept = []
            for ext in self.extensions:
                name = self.get_ext_filename(self.get_ext_fullname(ext.name))
                if Path(self.build_lib, name).exists():
                    kept.append(ext)
                else:
                    (ROOT / name).unlink(missing_ok=True)
            self.extensions = kept
            super().copy_extensions_to_source()

        def _cmake(self, target: Path, nvcc: str):
            import pybind11

            cmake = _tool("cmake")
            if cmake is None:
                raise RuntimeError("cmake was not found (pip install cmake)")
            build_dir = Path(self.build_temp).resolve() / "cmake"
            out_dir = build_dir / "out"
            args = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DFLIX_CUDA_ARCHS={cuda_archs()}",
                    f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"]
            ninja = _tool("ninja")
            if ninja is not None:
                args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
            subprocess.run(args, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)
            built = glob.glob(str(out_dir / "_C*"))
            if len(built) != 1:
                raise RuntimeError(f"expected one built _C library in {out_dir}, found {built}")
            shutil.copyfile(built[0], target)

    setup(ext_modules=[Extension("flix_kernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
