"""The yardstick of `bench_llm.py --peers` (benchmarks/llm_peers.py): the layer-streamed fp32 forward
equals transformers' own, the quality figures, and the placeholder tokenizer llama.cpp's converter reads."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import llm_peers

    yield llm_peers
    sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)  # logits far from uniform, so a wrong mask or rotary shows
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    return folder, model


def test_streamed_fp32_forward_is_transformers_forward(peers, tiny_llama):
    folder, model = tiny_llama
    ids = list(range(3, 40))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = peers.fp32_logits(folder, ids, threads=1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_quality_is_kl_and_perplexity_against_the_reference(peers):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(16, 50)) * 2
    same = peers.quality(ref, ref)
    assert same["kl_nats"] == pytest.approx(0, abs=1e-12) and same["top1_agree"] == 1
    assert same["ppl_vs_fp32_text"] == pytest.approx(same["ppl_fp32_floor"])
    noisy = peers.quality(ref, ref + rng.normal(size=ref.shape))
    noisier = peers.quality(ref, ref + 3 * rng.normal(size=ref.shape))
    assert 0 < noisy["kl_nats"] < noisier["kl_nats"]
    # perplexity on reference-distributed text = floor * exp(KL)
    assert noisy["ppl_vs_fp32_text"] == pytest.approx(noisy["ppl_fp32_floor"] * np.exp(noisy["kl_nats"]))
    assert peers.quality(ref, ref + 7.0)["kl_nats"] == pytest.approx(0, abs=1e-9)  # a constant shift is no change


def test_placeholder_tokenizer_has_the_vocabulary_size(peers, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    peers._placeholder_spm(tmp_path / "tokenizer.model", 1234)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == 1234
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.is_control(1) and sp.is_control(2) and sp.is_unknown(0)
