"""Registers, shared memory, spills and the occupancy they allow, per CUDA kernel, from ptxas.

    python benchmarks/cuda_resource_usage.py [--out benchmarks/results/cuda_resource_usage_sm90.txt]

Compiles csrc/cuda/*.cu for sm_90 with nvcc --resource-usage (through .ci/compile_cuda, so no GPU
is needed) and prints one row per kernel instantiation. Occupancy is the share of an H100 SM's
64 resident warps that the kernel's registers and shared memory allow at its block size (256
threads for every bnext kernel): 65536 registers per SM, allocated per warp in units of 256,
228 KB of shared memory per SM with 1 KB reserved per block.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS_PER_BLOCK = 256
WARPS_PER_SM = 64
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in multiples of this
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
MAX_BLOCKS_PER_SM = 32

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'")
SPILLS = re.compile(r"\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def occupancy(registers, shared_bytes):
    warps_per_block = THREADS_PER_BLOCK // 32
    registers_per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks_by_registers = REGISTERS_PER_SM // (registers_per_warp * warps_per_block)
    blocks_by_shared = SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    blocks = min(blocks_by_registers, blocks_by_shared, MAX_BLOCKS_PER_SM, WARPS_PER_SM // warps_per_block)
    return blocks * warps_per_block / WARPS_PER_SM


def short_name(mangled):
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    demangled = re.sub(r"bnext::cuda::\(anonymous namespace\)::", "", demangled)
    demangled = demangled.replace("c10::", "").replace("bnext::", "").removeprefix("void ")
    return demangled.split("(")[0]


def parse(log):
    kernels = []
    current = None
    for line in log.splitlines():
        if match := ENTRY.search(line):
            current = {"kernel": short_name(match.group(1)), "spill_bytes": 0}
            kernels.append(current)
        elif current and (match := SPILLS.search(line)):
            current["spill_bytes"] = sum(map(int, match.groups()))
        elif current and (match := USAGE.search(line)):
            current["registers"] = int(match.group(1))
            current["smem"] = int(match.group(2) or 0)
    return kernels


def report(kernels):
    lines = [f"{'kernel':100s} {'regs':>4s} {'smem B':>6s} {'spill B':>7s} {'occupancy':>9s}"]
    for k in sorted(kernels, key=lambda k: k["kernel"]):
        lines.append(
            f"{k['kernel'][:100]:100s} {k['registers']:4d} {k['smem']:6d} {k['spill_bytes']:7d} "
            f"{occupancy(k['registers'], k['smem']):9.0%}"
        )
    per_kind = collections.Counter(k["kernel"].split("<")[0] for k in kernels)
    lines.append("")
    lines.append("instantiations: " + ", ".join(f"{name} {count}" for name, count in sorted(per_kind.items())))
    lines.append(f"spilling kernels: {sum(1 for k in kernels if k['spill_bytes'])}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    # The same nvcc for the compile and for the version line.
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_cuda")],
        env={**os.environ, "NVCC": nvcc, "NVCC_EXTRA_FLAGS": "--resource-usage"},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"nvcc failed:\n{result.stdout}\n{result.stderr}")
    kernels = parse(result.stdout + result.stderr)
    if not kernels:
        sys.exit("no kernel found in nvcc's output")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[-2]
    text = f"nvcc --resource-usage, sm_90 ({version}), {THREADS_PER_BLOCK} threads per block\n\n{report(kernels)}\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
