"""Run a command with the CPU's AMX tiles denied to it: `python benchmarks/no_amx.py -- CMD ...`.

Linux hands AMX tile state to a process only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM); ONNX
Runtime's MLAS, oneDNN (torch, OpenVINO) and valley_rt.cpu ask before they use AMX and fall back to
their AVX-512 kernels (bf16 / VNNI dot products) when refused. A seccomp filter refuses that one
request (EPERM) for the command and every process it starts, so an AMX Xeon runs the code paths a
CPU without AMX (e.g. Zen 4: AVX512-BF16/VNNI) takes. It emulates the ISA, not that CPU: clocks,
caches and memory stay the Xeon's. Linux x86-64 only.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH_X86_64, SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM = 0xC000003E, 158, 0x1023
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K


def deny_amx() -> None:
    """Install the filter in this process (inherited by its children across fork and exec)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise SystemExit("error: no_amx.py needs Linux on x86-64")
    program = [  # (code, jump if true, jump if false, k); seccomp_data: nr at 0, arch at 4, args[0] at 16
        (LD_ABS_W, 0, 0, 4), (JEQ_K, 0, 5, AUDIT_ARCH_X86_64),
        (LD_ABS_W, 0, 0, 0), (JEQ_K, 0, 3, SYS_ARCH_PRCTL),
        (LD_ABS_W, 0, 0, 16), (JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
        (RET_K, 0, 0, RET_EPERM), (RET_K, 0, 0, RET_ALLOW),
    ]
    code = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buf))  # struct sock_fprog
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    word = ctypes.c_ulong  # prctl is variadic: each argument a full 64-bit word, as the kernel reads it
    if prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), word(1), word(0), word(0), word(0)) != 0:
        raise SystemExit(f"error: prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    if prctl(ctypes.c_int(PR_SET_SECCOMP), word(SECCOMP_MODE_FILTER), ctypes.c_char_p(fprog), word(0), word(0)) != 0:
        raise SystemExit(f"error: prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise SystemExit("usage: python benchmarks/no_amx.py -- COMMAND [ARGS ...]")
    deny_amx()
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
