"""The one GPTQ reader (`export.gptq_format`), checked against GPTQModel's own code rather than against
itself: GPTQModel packs the tensors (`pack_original`), converts them to the stored v1 format
(`convert_gptq_v2_to_v1_format_module`: zero points minus one, as one subtraction per int32 word) and
dequantizes them (`dequantize_weight`). The zero points include 0 (v1's subtraction borrows from the
field above) and 15 (the largest 4-bit field)."""

import pytest
import torch

from valley_rt.errors import CheckpointError
from valley_rt.export.gptq_format import GPTQLinear, to_gptq_checkpoint, unpack_int32

IN, OUT, GS = 64, 32, 16


def _layer(bits: int, seed: int = 0):
    """Codes [in, out], zero points [groups, out] with runs of 0 and of the largest field, fp16-exact
    scales, an act-order-style g_idx, and the float weight W [in, out] they define."""
    g = torch.Generator().manual_seed(seed)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (IN, OUT), generator=g)
    zeros = torch.randint(0, top + 1, (IN // GS, OUT), generator=g)
    zeros[0, :8] = 0  # a whole packed word of zero points 0 (4 bits): v1 stores 0xEEEEEEEF
    zeros[1, ::3] = 0  # zeros scattered over every field position, next to non-zero fields
    zeros[2, :] = top
    zeros[3, 1::2] = 0
    scales = (torch.rand(IN // GS, OUT, generator=g) + 0.5).half().float()
    g_idx = torch.randperm(IN, generator=g) % (IN // GS)
    w = scales[g_idx] * (q - zeros[g_idx]).float()
    return q, zeros, scales, g_idx, w


@pytest.fixture(scope="module")
def gptqmodel_v1():
    """bits -> (GPTQModel's v1 tensors, its v2 qzeros, its dequantized weight [in, out], the layer)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module

    out = {}
    for bits in (2, 4, 8):
        q, zeros, scales, g_idx, w = _layer(bits, seed=bits)
        linear = torch.nn.Linear(IN, OUT, bias=False)
        linear.weight.data = w.t().contiguous()
        m = TorchLinear(bits=bits, group_size=GS, sym=False, desc_act=True, in_features=IN, out_features=OUT)
        m.pack_original(linear, scales.t().contiguous(), zeros.t().contiguous(), g_idx.int())
        v2_qzeros = m.qzeros.clone()
        convert_gptq_v2_to_v1_format_module(m, QuantizeConfig(bits=bits))  # what GPTQModel saves
        stored = {"qweight": m.qweight.clone(), "qzeros": m.qzeros.clone(), "scales": m.scales.clone(),
                  "g_idx": m.g_idx.clone()}
        convert_gptq_v1_to_v2_format_module(m, bits, torch.int32)  # what GPTQModel does on load
        assert torch.equal(m.qzeros, v2_qzeros)
        m.train()  # the plain torch dequantization path (eval mode may cache or use Triton)
        theirs = m.dequantize_weight().float()  # [in, out], fp16 arithmetic
        out[bits] = (stored, v2_qzeros, theirs, (q, zeros, scales, g_idx, w))
    return out


def _read(stored: dict, bits: int, minus_one: bool = True) -> GPTQLinear:
    return GPTQLinear.from_checkpoint(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"],
                                      bits=bits, group_size=GS, zeros_stored_minus_one=minus_one)


def test_v1_word_of_zero_points_zero_by_hand():
    # eight zero points 0 in one word: 0x00000000 - 0x11111111 = 0xEEEEEEEF (mod 2**32), int32 -286331153.
    # A field-by-field reading takes it for zero points 0xF + 1 = 16 and 0xE + 1 = 15.
    lin = GPTQLinear.from_checkpoint(torch.zeros(1, 8, dtype=torch.int32),
                                     torch.tensor([[-286331153]], dtype=torch.int32),
                                     torch.ones(1, 8, dtype=torch.float16), None,
                                     bits=4, group_size=-1, zeros_stored_minus_one=True)
    assert lin.zeros.tolist() == [[0] * 8]
    # zero points 15, 0, 1, 0, 15, 15, 0, 3 (field 0 in the low bits), stored as their packed word minus 0x11111111
    word = sum(z << (4 * k) for k, z in enumerate([15, 0, 1, 0, 15, 15, 0, 3]))
    stored = (word - 0x11111111) % 2**32
    stored -= 2**32 if stored >= 2**31 else 0
    lin = GPTQLinear.from_checkpoint(torch.zeros(1, 8, dtype=torch.int32), torch.tensor([[stored]], dtype=torch.int32),
                                     torch.ones(1, 8, dtype=torch.float16), None,
                                     bits=4, group_size=-1, zeros_stored_minus_one=True)
    assert lin.zeros.tolist() == [[15, 0, 1, 0, 15, 15, 0, 3]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reader_matches_gptqmodel_pack_and_dequantize(gptqmodel_v1, bits):
    stored, _, theirs, (q, zeros, _, g_idx, w) = gptqmodel_v1[bits]
    lin = _read(stored, bits)
    assert torch.equal(lin.q, q) and torch.equal(lin.zeros, zeros) and torch.equal(lin.g_idx, g_idx)
    ours = lin.dequantize()
    assert torch.equal(ours, w)  # fp16-exact scales times small integers: exact in float32
    # GPTQModel's dequantization works in fp16: equal up to its rounding (a zero point off by one is a
    # whole scale, >= 0.5, away)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reader_of_v2_and_writer_match_gptqmodel(gptqmodel_v1, bits):
    stored, v2_qzeros, _, (q, zeros, scales, g_idx, w) = gptqmodel_v1[bits]
    assert torch.equal(_read({**stored, "qzeros": v2_qzeros}, bits, minus_one=False).dequantize(), w)
    # our writer produces GPTQModel's stored bytes, v1 and v2
    lin = GPTQLinear(q=q, zeros=zeros, scales=scales, g_idx=g_idx, bits=bits, group_size=GS)
    for key, tensor in to_gptq_checkpoint(lin).items():
        assert torch.equal(tensor, stored[key].to(tensor.dtype)), key
    assert torch.equal(to_gptq_checkpoint(lin, zeros_stored_minus_one=False)["qzeros"], v2_qzeros)
    assert torch.equal(unpack_int32(v2_qzeros, bits, dim=1), zeros)


def test_a_g_idx_of_the_wrong_length_is_one_error():
    with pytest.raises(CheckpointError, match="g_idx expected 8 entries, got 4"):
        GPTQLinear.from_checkpoint(torch.zeros(1, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, 8, dtype=torch.float16), torch.zeros(4, dtype=torch.int32),
                                   bits=4, group_size=-1, zeros_stored_minus_one=True)


def test_an_rtn4_gptq_folder_and_the_engine_built_from_it_hold_the_same_weights(tmp_path):
    """export --quant rtn4 --gptq-folder: round-to-nearest written as a standard GPTQ folder (symmetric,
    v1 zero points: what vLLM loads), read back by valley-rt's GPTQ reader as quantize_rtn's weights
    with fp16 scales; the other tensors stay, in fp16; the engine's LLM graph is built from that folder
    (MatMulNBits holds the same dequantized weights)."""
    import json

    from valley_rt.export.engine import _export_llm
    from valley_rt.export.gptq import load_gptq_as_torch
    from valley_rt.export.llm_onnx import _Tensors, quantize_rtn, write_rtn_gptq_folder
    from valley_rt.runtime import DEMO_CHECKPOINT

    src = DEMO_CHECKPOINT / "llm"
    asym = write_rtn_gptq_folder(src, tmp_path / "asym", group_size=32, sym=False)
    assert json.loads((asym / "config.json").read_text())["quantization_config"]["sym"] is False
    entry = _export_llm(DEMO_CHECKPOINT, tmp_path / "llm", model=None, quant="rtn4", bits=4, group_size=32,
                        desc_act=False, calib=None, calib_samples=0, keep_failed_gate=False, gptq_folder=True)
    assert entry["quant"] == "rtn4-g32-sym"
    out = tmp_path / "llm" / "gptq"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["sym"] is True and qc["desc_act"] is False and qc["group_size"] == 32
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    model = load_gptq_as_torch(out)
    fp = _Tensors(src)
    key = "model.layers.1.mlp.down_proj"
    w = fp.get(key + ".weight").float()
    for folder, sym in ((out, True), (asym, False)):
        lin = quantize_rtn(w.T, bits=4, group_size=32, sym=sym)
        expected = (lin.scales.half().float()[lin.g_idx] * (lin.q - lin.zeros[lin.g_idx]).float()).T
        got = load_gptq_as_torch(folder).get_submodule(key).weight.float()
        assert torch.equal(got, expected)
        assert 0 < (got - w).abs().max() < 0.2 * w.abs().max()  # quantized, not a copy
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(model.get_parameter(norm).float(), fp.get(norm).half().float())
    # the graph was built from that folder (the GPTQ reader), not from the fp weights
    meta = json.loads((tmp_path / "llm" / "llm_onnx.json").read_text())
    assert meta["quant"]["quant"] == "gptq" and meta["quant"]["sym"] is True and meta["quant"]["group_size"] == 32


def test_remove_earlier_output_only_removes_a_quantizer_output(tmp_path):
    """The check runs again at removal time (a quantization can take hours): a folder that gained other
    files meanwhile is refused and kept; an earlier output (its marker) or an empty folder is cleared."""
    from valley_rt.export.gptq_format import OUTPUT_MARKER, remove_earlier_output

    mine = tmp_path / "earlier"
    mine.mkdir()
    (mine / OUTPUT_MARKER).write_text("{}")
    (mine / "model.safetensors").write_bytes(b"x")
    remove_earlier_output(mine)
    assert not mine.exists()
    theirs = tmp_path / "user"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="found other files"):
        remove_earlier_output(theirs)
    assert (theirs / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_earlier_output(empty)
    remove_earlier_output(tmp_path / "missing")  # nothing there: nothing to do
    assert not empty.exists()
