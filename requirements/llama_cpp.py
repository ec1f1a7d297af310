"""The llama.cpp that GGUF exports use, pinned and built from source.

    python requirements/llama_cpp.py DEST                 # `make llama-cpp` (DEST .venv/llama.cpp); the image
    python requirements/llama_cpp.py DEST --python-only   # the converter alone (f16, bf16, q8_0): no compiler

The source is the llama.cpp that the `llama-cpp-python` sdist on PyPI vendors (PyPI is the one
registry every machine here reaches), pinned by version and sha256 below. DEST gets what Unsloth
and trainer/export.py look for: `llama-quantize`, `convert_hf_to_gguf.py` with its `conversion/`
and `gguf-py/`; what trainer/export_check.py checks each GGUF file with: `llama-perplexity` (the
perplexity of held-out rows) and `llama-completion` (prompts through the file's embedded chat
template, --jinja); and `llama-simple` (a small runner the README loads a GGUF file back with).
Built once: DEST/.built records the pin, and a later call with the same pin does nothing. Needs
cmake and a C++ compiler (two CPU cores take several minutes; 20 on two busy ones). `--python-only`
copies the converter without building anything: enough for f16, bf16 and q8_0 files written with
`export --no-check`, which the CPU tests write; the image tests cover llama-quantize, the checks
of GGUF files and loading one back. Change the pin on purpose, like a lock: version, URL and
sha256 together.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

VERSION = "0.3.36"
URL = (
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    f"llama_cpp_python-{VERSION}.tar.gz"
)
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS = ("llama-quantize", "llama-simple", "llama-perplexity", "llama-completion")
PYTHON_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
# A portable CPU build (no -march=native: the image runs on other machines than the one that built
# it) of the library and these tools only: no server, no tests, no network code.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)


def download(dest: Path, attempts: int = 4) -> None:
    """The pinned sdist, retried (a network step), checked against its sha256."""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(URL, timeout=120) as response, dest.open("wb") as out:
                shutil.copyfileobj(response, out)
            break
        except OSError as exc:
            if attempt == attempts:
                raise SystemExit(f"error: could not download {URL} after {attempts} tries ({exc})") from None
            time.sleep(5 * attempt)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"error: {dest.name} has sha256 {digest}, not the pinned {SHA256}; not building it")


def built(dest: Path) -> set[str]:
    """What DEST already holds of this pin: "python", and each tool of TARGETS once compiled (a
    build from before a tool joined TARGETS is built again)."""
    stamp = dest / ".built"
    lines = stamp.read_text().split() if stamp.is_file() else []
    return set(lines[1:]) if lines[:1] == [SHA256] else set()


def build(dest: Path, tools: bool = True) -> None:
    wanted = {"python", *TARGETS} if tools else {"python"}
    if wanted <= built(dest):
        return
    with tempfile.TemporaryDirectory(prefix="llama-cpp-") as work:
        sdist = Path(work) / "src.tar.gz"
        download(sdist)
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = Path(work) / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for part in PYTHON_PARTS:
            copy = shutil.copytree if (source / part).is_dir() else shutil.copy2
            copy(source / part, staging / part)
        if tools:
            build_dir = Path(work) / "build"
            jobs = str(os.cpu_count() or 2)
            subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_OPTIONS], check=True)
            subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TARGETS], check=True)
            for target in TARGETS:
                shutil.copy2(build_dir / "bin" / target, staging / target)
        (staging / ".built").write_text(" ".join([SHA256, *sorted(wanted)]) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)


def main() -> int:
    args = sys.argv[1:]
    python_only = "--python-only" in args
    folders = [a for a in args if a != "--python-only"]
    if len(folders) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    build(Path(folders[0]).resolve(), tools=not python_only)
    print(f"llama.cpp (llama-cpp-python {VERSION}'s){' converter' if python_only else ''} in {folders[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
