"""The float instructions that decide bits, in torch's CUDA kernels and in ours, read without a GPU.

Why: on a GPU our Triton kernels give qwen-tts's bf16 values only if they run the same arithmetic as the
torch ops they stand for: the same rsqrt, exp and division instructions, and each product rounded where
torch rounds it (no fused multiply-add). That is visible in the machine code before any GPU run: torch's
Linux wheel carries its kernels' SASS (libtorch_cuda.so), Triton ships cuobjdump, and Triton compiles ours
for any architecture here. Extracting torch's cubins takes about 20 s and 0.7 GB of temporary disk.

    python scripts/kernel_instructions.py              # sm_90, the H100
    python scripts/kernel_instructions.py --arch 120   # the DGX Spark's GB10 (sm_121 runs torch's sm_120 code)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

from tts_service import fused_kernels as fk

# torch's kernels for the ops ours replace: (kernel name in the cubin, the mangled dtype of its lambda)
TORCH_KERNELS = {"rsqrt": ("rsqrt_kernel_cuda", "UlfE_"), "silu": ("silu_kernel", "c108BFloat16")}
# What decides bits, as a pattern in SASS (the division's slow path also runs MUFU.RSQ on a NaN constant)
FEATURES = {
    "rsqrt: MUFU.RSQ": r"MUFU\.RSQ R\d+, R",
    "sqrt: MUFU.SQRT": r"MUFU\.SQRT",
    "exp: expf's range reduction (12582913), MUFU.EX2": r"12582913[\s\S]*MUFU\.EX2",
    "IEEE division: MUFU.RCP and FCHK": r"MUFU\.RCP[\s\S]*FCHK|FCHK[\s\S]*MUFU\.RCP",
}
# Which torch kernel's features each of ours must have, for the features of that op
MATCHES = {
    "qk_norm_rope_kv": ("rsqrt", ["rsqrt: MUFU.RSQ", "sqrt: MUFU.SQRT"]),
    "qk_norm_rope_kv prefill": ("rsqrt", ["rsqrt: MUFU.RSQ", "sqrt: MUFU.SQRT"]),
    "rms_norm": ("rsqrt", ["rsqrt: MUFU.RSQ", "sqrt: MUFU.SQRT"]),
    "rms_norm prefill": ("rsqrt", ["rsqrt: MUFU.RSQ", "sqrt: MUFU.SQRT"]),
    "silu_mul": ("silu", list(FEATURES)),
    "sample_top_k": ("silu", ["IEEE division: MUFU.RCP and FCHK"]),
}
# Where torch's kernel fuses a product into a sum: expf's last product with SiLU's 1 + (nowhere else: RoPE's
# products and the squares are rounded by ops of their own before they are summed)
FUSES = {"silu_mul"}


def cuobjdump(*args: str, cwd: Path | None = None) -> str:
    """Runs Triton's cuobjdump (CUDA's, shipped in Triton's wheel) and returns its output."""
    tool = triton.knobs.nvidia.cuobjdump.path
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, cwd=cwd).stdout


def functions(sass: str) -> dict[str, str]:
    """SASS text split by function: {mangled name: its instructions}."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def torch_sass(arch: int) -> dict[str, str]:
    """The SASS of torch's vectorized kernel for each op of TORCH_KERNELS (float for rsqrt, bf16 for SiLU)."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cuda.so"
    found: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cuobjdump("-xelf", f"sm_{arch}", str(library), cwd=Path(tmp))
        for cubin in sorted(Path(tmp).glob("*.cubin")):
            data = cubin.read_bytes()
            for op, (kernel, dtype) in TORCH_KERNELS.items():
                if op in found or kernel.encode() not in data:
                    continue
                for name, code in functions(cuobjdump("-sass", str(cubin))).items():
                    if kernel in name and "vectorized_elementwise_kernel" in name and dtype in name:
                        found[op] = code
                        break
    missing = set(TORCH_KERNELS) - set(found)
    if missing:
        raise SystemExit(f"torch {torch.__version__} has no sm_{arch} kernel for {sorted(missing)} in {library}")
    return {op: found[op] for op in TORCH_KERNELS}


def our_code(arch: int) -> dict[str, tuple[str, str]]:
    """Our kernels compiled for sm_<arch>, each as (PTX, SASS)."""
    code = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, compiled in fk.compiled_for(arch).items():
            cubin = Path(tmp) / f"{name}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            code[name] = (compiled.asm["ptx"], cuobjdump("-sass", str(cubin)))
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch", type=int, default=90, help="the SM version: 90 (H100) or 120 (GB10's family); torch's wheel has both"
    )
    parser.add_argument("--cache-dir", type=Path, help="(unused; accepted like the other diagnostic scripts)")
    args = parser.parse_args()
    found = torch_sass(args.arch)
    ours = our_code(args.arch)
    columns = {f"torch {op}": sass for op, sass in found.items()} | {name: sass for name, (_, sass) in ours.items()}
    has = {column: {f: bool(re.search(p, sass)) for f, p in FEATURES.items()} for column, sass in columns.items()}
    print(f"\nFloat instructions on sm_{args.arch} (torch {torch.__version__}, Triton {triton.__version__}):\n")
    print("| instruction | " + " | ".join(columns) + " |")
    print("| --- |" + " :---: |" * len(columns))
    for feature in FEATURES:
        print(f"| {feature} | " + " | ".join("yes" if has[c][feature] else "" for c in columns) + " |")
    ptx_checks = {"a product fused into its sum (PTX fma.rn)": r"\bfma\.rn\.(f32|bf16)", "div.full (PTX)": r"div\.full"}
    for check, pattern in ptx_checks.items():
        cells = ["(SASS only)" for c in columns if c.startswith("torch")]
        cells += ["yes" if re.search(pattern, ptx) else "" for ptx, _ in ours.values()]
        print(f"| {check} | " + " | ".join(cells) + " |")
    wrong = [
        name
        for name, (op, features) in MATCHES.items()
        if any(has[name][f] != has[f"torch {op}"][f] for f in features)
        or "div.full" in ours[name][0]
        or bool(re.search(ptx_checks["a product fused into its sum (PTX fma.rn)"], ours[name][0])) != (name in FUSES)
    ]
    print("\nEach kernel against the torch kernel it stands for:")
    for name, (op, features) in MATCHES.items():
        print(f"- {name}: torch {op}, as to " + "; ".join(f.split(":")[0] for f in features))
    print("OTHER ARITHMETIC: " + ", ".join(wrong) if wrong else "THE SAME ARITHMETIC")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
