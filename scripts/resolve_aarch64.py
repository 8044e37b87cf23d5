"""Resolve the Bento's whole requirement set for the DGX Spark (aarch64, manylinux_2_28, Python 3.11)
from PyPI alone, wheels only, say whether torch is the CUDA 13 build, and (--archs) which GPU
architectures the aarch64 torch wheel carries kernels for.

    python3 -m venv /tmp/uv && /tmp/uv/bin/pip install uv pyyaml
    /tmp/uv/bin/python scripts/resolve_aarch64.py --archs

Resolution uses `uv pip compile --python-platform aarch64-manylinux_2_28 --no-build`, which reads wheel
metadata only. --archs downloads the torch wheel for aarch64 (420 MB) and reads the fat binaries of its
`libtorch_cuda.so` directly (no GPU, no aarch64 machine: `torch.cuda.get_arch_list()` needs both). Exit
status 0 when every package resolves to a wheel for the platform, torch requires the CUDA 13 toolkit,
and (with --archs) the wheel has kernels a GB10 (sm_121) can run: sm_121 or sm_120 code (binary
compatible within compute capability 12.x) or PTX to compile.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PLATFORM = "aarch64-manylinux_2_28"


def requirements() -> list[str]:
    bentofile = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    bentoml = next(line for line in (REPO_ROOT / "pyproject.toml").read_text().splitlines() if '"bentoml==' in line)
    return [*bentofile["python"]["packages"], bentoml.strip().strip('",')]


def elf_section(path: Path, name: str) -> bytes:
    """The bytes of one section of a 64-bit little-endian ELF file (any machine architecture)."""
    with path.open("rb") as f:
        header = f.read(64)
        (shoff,) = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        f.seek(sections[shstrndx][4])
        names = f.read(sections[shstrndx][5])
        for sh_name, _type, _flags, _addr, offset, size in sections:
            if names[sh_name : names.index(b"\0", sh_name)].decode() == name:
                f.seek(offset)
                return f.read(size)
    raise ValueError(f"{path} has no {name} section")


def fatbin_archs(library: Path) -> Counter:
    """(kind, sm) -> number of fat-binary entries, kind "SASS" (a cubin) or "PTX"."""
    data, found, pos = elf_section(library, ".nv_fatbin"), Counter(), 0
    while pos + 16 <= len(data):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != 0xBA55ED50:
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= end:
            kind, _version, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            (sm,) = struct.unpack_from("<I", data, entry + 28)
            found[("PTX" if kind == 1 else "SASS", sm)] += 1
            if entry_header == 0:
                break
            entry += entry_header + padded
        pos = end
    return found


def torch_archs(torch_pin: str) -> bool:
    """Download the aarch64 torch wheel and list the architectures of libtorch_cuda.so's kernels."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", torch_pin, "--no-deps", "--only-binary=:all:"]
        command += ["--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "-d", tmp, "-q"]
        subprocess.run(command, check=True)
        (wheel,) = Path(tmp).glob("torch-*.whl")
        library = Path(tmp) / "libtorch_cuda.so"
        with zipfile.ZipFile(wheel) as archive, archive.open("torch/lib/libtorch_cuda.so") as source:
            with library.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 24)
        counts = fatbin_archs(library)
    for kind in ("SASS", "PTX"):
        listed = ", ".join(f"sm_{sm} ({n})" for (k, sm), n in sorted(counts.items()) if k == kind) or "none"
        print(f"{wheel.name}: {kind} entries in libtorch_cuda.so: {listed}")
    runnable = [sm for (_kind, sm) in counts if sm in (120, 121)] + [sm for (k, sm) in counts if k == "PTX"]
    print("PASS: a GB10 (sm_121) runs these kernels" if runnable else "FAIL: no sm_120/sm_121 code and no PTX")
    return bool(runnable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", action="store_true", help="also list the aarch64 torch wheel's GPU architectures")
    args = parser.parse_args(argv)
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    with tempfile.TemporaryDirectory() as tmp:
        source, lock = Path(tmp) / "requirements.in", Path(tmp) / "requirements.txt"
        source.write_text("\n".join(requirements()) + "\n")
        command = [uv, "pip", "compile", str(source), "--python-platform", PLATFORM, "--python-version", "3.11"]
        command += ["--no-build", "--no-header", "--no-annotate", "-o", str(lock)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"FAIL: the requirements do not resolve to {PLATFORM} wheels:\n{result.stderr}")
            return 1
        pins = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    cuda = sorted(p for p in pins if re.match(r"(nvidia-|cuda-|triton)", p))
    torch = next(p for p in pins if p.startswith("torch=="))
    print(f"{len(pins)} packages resolve to wheels for {PLATFORM}, Python 3.11, from PyPI alone ({torch}).")
    print("CUDA packages torch brings:", ", ".join(cuda))
    ok = "cuda-toolkit==13.0.2" in cuda and any(p.startswith("nvidia-cudnn-cu13") for p in cuda)
    print("PASS: torch is the CUDA 13 build" if ok else "FAIL: torch does not require the CUDA 13 toolkit")
    if args.archs:
        ok = torch_archs(torch) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
