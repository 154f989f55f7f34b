"""The GPTQ tensor format, read and written in one place: int32-packed codes and zero points.

A GPTQ linear is stored as four tensors (in = in_features, out = out_features, G = groups):
    qweight [in * bits / 32, out] int32   codes, 32/bits per word along `in`, field k at bit k * bits
    qzeros  [G, out * bits / 32]  int32   zero points, packed the same way along `out`
    scales  [G, out]              fp16
    g_idx   [in]                  int32   the group of each input row (non-monotone with act-order)
    W[o, i] = scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])

checkpoint_format "gptq" (v1, what GPTQModel writes by default and what transformers/vLLM load) stores
the zero points minus one, and GPTQModel computes that as ONE int32 subtraction of the word 0x11111111
(4 bits; 0x01010101 for 8, 0x55555555 for 2) from each packed word, not field by field: a zero point
of 0 borrows from the field above it. Reading it back is the same word-wide addition
(`gptqmodel.utils.model.convert_gptq_v1_to_v2_format_module`). "gptq_v2" stores the zero points as
they are. Every consumer (the plain-torch loader behind the export's accuracy gate, the ONNX repacker,
the tests) goes through `GPTQLinear.from_checkpoint`, so there is one reader to get right.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from valley_rt.errors import CheckpointError

FORMATS = ("gptq", "gptq_v2")  # checkpoint_format values: v1 stores zeros minus one, v2 as they are
OUTPUT_MARKER = "valley_gptq.json"  # written into every GPTQ folder valley-rt's quantizers make


def check_replaceable(out_dir: Path) -> None:
    """A quantizer may write `out_dir` only when it does not exist, is empty, or is an earlier output of
    valley-rt's quantizers (it holds OUTPUT_MARKER); anything else is refused, never replaced."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / OUTPUT_MARKER).is_file():
        raise CheckpointError(f"{out_dir}: expected a new folder or an earlier GPTQ output to replace, "
                              "found other files")


def remove_earlier_output(out_dir: Path) -> None:
    """Clear `out_dir` before a quantizer writes it: checked again here, since the quantization run
    between the caller's first check and this point can take hours."""
    check_replaceable(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits fields (field i at bit i*bits) -> int64 fields, expanded along dim."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [..] unsigned view
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if dim == 0:  # [R, C] -> [R * per, C]
        fields = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return fields.reshape(-1, packed.shape[1])
    fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [R, C, per]
    return fields.reshape(packed.shape[0], -1)


def pack_int32(fields: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_int32 (fields already in [0, 2**bits))."""
    per = 32 // bits
    f = fields.to(torch.int64)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if dim == 0:
        f = f.reshape(-1, per, f.shape[1]) << shifts[None, :, None]
        words = f.sum(dim=1)
    else:
        f = f.reshape(f.shape[0], -1, per) << shifts[None, None, :]
        words = f.sum(dim=2)
    return _as_int32(words)


def _ones_word(bits: int) -> int:
    """The word with a 1 in every field (0x11111111 for 4 bits): what v1 subtracts from each qzeros word."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words taken mod 2**32, reinterpreted as signed int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return words.where(words < 2**31, words - 2**32).to(torch.int32)


@dataclass
class GPTQLinear:
    """One linear layer in GPTQ terms, unpacked: W[i, j] = scales[g[i], j] * (q[i, j] - zeros[g[i], j])."""

    q: torch.Tensor  # [in, out] int64 in [0, 2**bits)
    zeros: torch.Tensor  # [groups, out] int64 in [0, 2**bits)
    scales: torch.Tensor  # [groups, out] float32
    g_idx: torch.Tensor  # [in] int64 group of each input row
    bits: int
    group_size: int  # rows per group (in_features when the checkpoint says -1)

    @classmethod
    def from_checkpoint(cls, qweight, qzeros, scales, g_idx, *, bits: int, group_size: int,
                        zeros_stored_minus_one: bool) -> "GPTQLinear":
        """Read one linear's stored tensors; zeros_stored_minus_one = checkpoint_format "gptq" (v1)."""
        q = unpack_int32(qweight, bits, dim=0)  # [in, out]
        words = qzeros.to(torch.int64) & 0xFFFFFFFF
        if zeros_stored_minus_one:  # undo v1's word-wide subtraction, borrows included
            words = (words + _ones_word(bits)) & 0xFFFFFFFF
        zeros = unpack_int32(words, bits, dim=1)[:, : q.shape[1]]  # [groups, out]
        in_features = q.shape[0]
        gs = in_features if group_size == -1 else group_size
        if g_idx is None:
            g_idx = torch.arange(in_features) // gs
        if g_idx.shape[0] != in_features:
            raise CheckpointError(f"GPTQ linear: g_idx expected {in_features} entries, got {g_idx.shape[0]}")
        return cls(q=q, zeros=zeros, scales=scales.float(), g_idx=g_idx.to(torch.int64), bits=bits, group_size=gs)

    def dequantize(self) -> torch.Tensor:
        """The plain-torch reference: [in, out] float32."""
        g = self.g_idx
        return self.scales[g] * (self.q - self.zeros[g]).float()


def to_gptq_checkpoint(lin: GPTQLinear, *, zeros_stored_minus_one: bool = True) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear, as GPTQModel writes them (v1 by default: zeros minus one, word-wide)."""
    words = pack_int32(lin.zeros, lin.bits, dim=1).to(torch.int64)
    if zeros_stored_minus_one:
        words = words - _ones_word(lin.bits)
    return {
        "qweight": pack_int32(lin.q, lin.bits, dim=0),
        "qzeros": _as_int32(words),
        "scales": lin.scales.half(),
        "g_idx": lin.g_idx.to(torch.int32),
    }
