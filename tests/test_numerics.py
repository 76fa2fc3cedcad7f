"""The numerics policy under --precision bf16 (CPU, seconds): reduced precision only in the backbone and the Linear
layers; center search, synthesis, sigmoid and losses in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cras
import pbas

D, POSITIONS, IMAGES = 64, 16, 2


def near_ties() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows and centers whose cosine similarities differ by less than 2^-8 (bf16's resolution near 1)."""
    gen = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(1, D, generator=gen), dim=1)
    centers = base + 2e-3 * torch.randn(POSITIONS, D, generator=gen)
    rows = base.repeat(IMAGES * POSITIONS, 1) + 2e-3 * torch.randn(IMAGES * POSITIONS, D, generator=gen)
    sims = F.normalize(rows, dim=1) @ F.normalize(centers, dim=1).T
    top2 = sims.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).max() < 2 ** -8
    return rows, centers, sims.argmax(dim=1)


def test_pbas_center_search_stays_fp32_under_bf16(monkeypatch):
    rows, centers, expected = near_ties()
    model = pbas.PBAS(pbas.PBASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, pre_proj=0, dsc_hidden=8),
                      precision="bf16")
    model.center = centers
    seen = []
    search = pbas.nearest_center
    monkeypatch.setattr(pbas, "nearest_center", lambda *a, **k: seen.append(search(*a, **k)) or seen[-1])
    model.train()
    loss, stats = model.loss(rows, torch.zeros(IMAGES, dtype=torch.long), POSITIONS)
    assert torch.equal(seen[0], expected)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_cras_center_search_stays_fp32_under_bf16(monkeypatch):
    rows, centers, expected = near_ties()
    model = cras.CRAS(cras.CRASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, pre_proj=0), 1, precision="bf16")
    model.center = centers.unsqueeze(0)
    seen = []
    search = cras.cosine_argmax
    monkeypatch.setattr(cras, "cosine_argmax", lambda *a, **k: seen.append(search(*a, **k)) or seen[-1])
    model.train()
    loss, _ = model.loss(rows, torch.zeros(IMAGES, dtype=torch.long), POSITIONS)
    assert torch.equal(seen[0].flatten(), expected)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_scores_near_one_are_not_rounded_to_bf16():
    """The sigmoid runs in float32: scores in (0.993, 0.9997) keep their resolution (bf16 has 2^-8 steps there)."""
    model = pbas.PBAS(pbas.PBASConfig(pretrain_embed_dimension=4, target_embed_dimension=4, pre_proj=0, dsc_layers=1),
                      precision="bf16")
    with torch.no_grad():
        model.discriminator.tail[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    logits = torch.linspace(5, 8, 200)
    feats = torch.stack([logits, torch.zeros(200), torch.zeros(200), torch.zeros(200)], 1)
    scores = model.discriminate(feats)
    assert scores.dtype == torch.float32
    assert len(torch.unique(scores)) > 50  # bf16 would give at most 3 distinct values here
    torch.testing.assert_close(scores.flatten(), torch.sigmoid(logits), atol=2e-4, rtol=0)  # the logits are bf16


@pytest.mark.parametrize("method", ["pbas", "cras"])
def test_a_bf16_training_step_on_the_cpu(method):
    """One optimisation step in bf16 (the full bf16 quality comparison belongs to the CUDA tier)."""
    torch.manual_seed(0)
    if method == "pbas":
        model = pbas.PBAS(pbas.PBASConfig(pretrain_embed_dimension=D, target_embed_dimension=D, dsc_hidden=32), precision="bf16")
        model.center = torch.randn(POSITIONS, D)
    else:
        model = cras.CRAS(cras.CRASConfig(pretrain_embed_dimension=D, target_embed_dimension=D), 2, precision="bf16")
        model.center = torch.randn(2, POSITIONS, D)
        model.seed_streams(0, torch.device("cpu"))
    feats, labels = torch.randn(IMAGES * POSITIONS, D), torch.tensor([0, 1 if method == "cras" else 0])
    before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    optimizers = model.make_optimizers()
    model.train()
    loss, stats = model.loss(feats, labels, POSITIONS)
    loss.backward()
    for opt in optimizers:
        opt.step()
    assert torch.isfinite(loss) and all(v.dtype == torch.float32 for v in stats.values())
    after = model.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("precision,matmul,cudnn", [("fp32", "highest", False), ("tf32", "high", True), ("bf16", "highest", False)])
def test_precision_switches(precision, matmul, cudnn):
    """fp32 really is fp32 (PyTorch leaves TF32 on for cuDNN convolutions by default); tf32 turns both on."""
    import utils

    try:
        utils.configure_precision(precision, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == matmul
        assert torch.backends.cudnn.allow_tf32 is cudnn
    finally:
        utils.configure_precision("fp32", torch.device("cpu"))
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
