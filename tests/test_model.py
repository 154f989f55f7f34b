"""The reference model against the spec's formulas, written out independently here."""

import math

import pytest
import torch

from valley_rt.config import preset
from valley_rt.model import build_model, sinusoid_table


def tiny(mode="mean", frames=4):
    cfg = preset("tiny")
    cfg.temporal.mode = mode
    return cfg, build_model(cfg, seed=1)


def layout_ids(cfg, n_patch, n_frame, text=(5, 6)):
    t = cfg.tokens
    return torch.tensor([[1, *text, t.im_start, *[t.im_patch] * n_patch, t.im_end, t.vi_start,
                          *[t.vi_frame] * n_frame, t.vi_end, 7]])


@pytest.mark.parametrize("mode", ["mean", "max", "importance", "transformer"])
def test_temporal_modes_match_spec(mode):
    cfg, model = tiny(mode)
    torch.manual_seed(0)
    p = torch.randn(2, 5, cfg.num_patches, cfg.llm.hidden_size)  # [B, T, N, D]
    with torch.no_grad():
        got = model.temporal(p)
        want = []
        for b in range(2):
            P = p[b]  # [T, N, D] as the spec writes it
            if mode == "mean":
                want.append(P.mean(0))
            elif mode == "max":
                want.append(P.max(0).values)
            elif mode == "importance":
                s = torch.softmax(model.temporal.pooling_layer(P.flatten(1)), dim=0)  # [T, 1]
                want.append((s[:, :, None] * P).sum(0))
            else:
                X = P.permute(1, 0, 2)  # [N, T, D]
                enc = model.temporal.transformer_delta_encoder
                delta = enc(X + model.temporal.position_matrix[: X.shape[1]])[:, -1, :]
                want.append(delta + X.mean(1))
        want = torch.stack(want)
    assert got.shape == (2, cfg.num_patches, cfg.llm.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_position_table_formula():
    table = sinusoid_table(16, 10)
    for k in (0, 3, 15):
        for i in range(5):
            assert table[k, 2 * i].item() == pytest.approx(math.sin(k / 10000 ** (2 * i / 10)), abs=1e-6)
            assert table[k, 2 * i + 1].item() == pytest.approx(math.cos(k / 10000 ** (2 * i / 10)), abs=1e-6)


def test_vision_runs_only_to_select_layer():
    cfg, model = tiny()
    pv = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad():
        full = model.vision_tower(pixel_values=pv.flatten(0, 1), output_hidden_states=True).hidden_states
        got = model.vision_features(pv)
    torch.testing.assert_close(got.flatten(0, 1), full[cfg.vision.select_layer], rtol=0, atol=0)
    calls = []
    last = model.vision_tower.encoder.layers[-1]
    last.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model.vision_features(pv)
    assert not calls, "the layer after select_layer ran"


def test_projector_before_pooling_and_frame_tokens():
    cfg, model = tiny("max")
    pv = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        feats = model.vision_features(pv)[0]  # [T, 1+N, C]
        proj = feats @ model.mm_projector.weight.T + model.mm_projector.bias
        pooled, frames = model.encode_video(pv)
    torch.testing.assert_close(frames[0], proj[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[0], proj[:, 1:].max(0).values, rtol=1e-5, atol=1e-6)


def test_splice_places_tokens_and_keeps_markers():
    cfg, model = tiny()
    ids = layout_ids(cfg, cfg.num_patches, 3)
    pooled = torch.randn(1, cfg.num_patches, 64)
    frames = torch.randn(1, 3, 64)
    with torch.no_grad():
        text = model.llm.get_input_embeddings()(ids)
        out = model.embed_inputs(ids, visual=(pooled, frames))
    t = cfg.tokens
    ids0 = ids[0]
    torch.testing.assert_close(out[0, ids0 == t.im_patch], pooled[0])
    torch.testing.assert_close(out[0, ids0 == t.vi_frame], frames[0])
    keep = (ids0 != t.im_patch) & (ids0 != t.vi_frame)
    torch.testing.assert_close(out[0, keep], text[0, keep])


@pytest.mark.parametrize("n_patch,n_frame,msg", [
    (255, 3, "255 <im_patch> placeholders but 256 pooled"),
    (256, 2, "2 <vi_frame> placeholders but 3 frame tokens"),
    (256, 4, "4 <vi_frame> placeholders but 3 frame tokens"),
])
def test_splice_count_mismatch_names_both_counts(n_patch, n_frame, msg):
    cfg, model = tiny()
    ids = layout_ids(cfg, n_patch, n_frame)
    with pytest.raises(ValueError, match=msg):
        model.embed_inputs(ids, visual=(torch.zeros(1, 256, 64), torch.zeros(1, 3, 64)))


def test_placeholders_without_video_raise():
    cfg, model = tiny()
    with pytest.raises(ValueError, match="no video"):
        model.embed_inputs(layout_ids(cfg, 256, 3))


def test_forward_logits_and_loss():
    cfg, model = tiny("importance")
    ids = layout_ids(cfg, 256, 4)
    labels = ids.clone()
    labels[:, :-2] = -100
    out = model(ids, torch.randn(1, 4, 3, 64, 64), labels=labels)
    assert out.logits.shape == (1, ids.shape[1], cfg.llm.vocab_size)
    assert torch.isfinite(out.loss)


def test_meta_build_allocates_nothing_and_counts_real_7b():
    from valley_rt.model import parameter_counts

    model = build_model(preset("valley2-7b"), device="meta")
    counts = parameter_counts(model)
    assert all(p.is_meta for p in model.parameters())
    assert 6.6e9 < counts["llm"] < 6.9e9  # LLaMA-2-7B + 6 added rows
    assert 0.29e9 < counts["vision_tower"] < 0.31e9  # CLIP ViT-L/14 vision
