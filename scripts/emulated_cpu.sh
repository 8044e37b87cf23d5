#!/usr/bin/env bash
# Write, under DIR, the CPU description an aarch64 program reads on a real ARM machine: /proc/cpuinfo and
# each CPU's MIDR_EL1, for the Neoverse N1 that qemu emulates (`-cpu neoverse-n1`).
#
#   scripts/emulated_cpu.sh DIR     # then: qemu-aarch64-static -cpu neoverse-n1 -L DIR ... (or QEMU_LD_PREFIX=DIR)
#
# Why: qemu-user shows programs the host's /proc/cpuinfo (x86) and no MIDR_EL1 file, and pytorch/cpuinfo,
# which onnxruntime initialises on import (and so qwen_tts), dereferences NULL on that. qemu's prefix (-L,
# QEMU_LD_PREFIX) serves these files in place of the host's. N1, not Grace's Neoverse V2: qemu 7.2 has no V2
# model, and with its `max` CPU (SVE) oneDNN's JIT made a transposed convolution that qemu stopped with
# SIGILL. So SVE kernels, which Grace runs, are not tried under emulation.
set -euo pipefail

DIR=$1
mkdir -p "$DIR/proc"
for cpu in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$cpu"
    mkdir -p "$DIR/sys/devices/system/cpu/cpu$cpu/regs/identification"
    echo 0x00000000414fd0c1 >"$DIR/sys/devices/system/cpu/cpu$cpu/regs/identification/midr_el1"
done >"$DIR/proc/cpuinfo"
