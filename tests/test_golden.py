"""The golden vectors of ../shared/golden (copied to tests/golden), produced by the authors' released PBAS and
CRAS code on CPU in float32, reproduced by this project's code."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import cras
import metrics
import pbas
from common import PatchEmbedder, anomaly_maps, gaussian_blur

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ATOL = 1e-5  # float32 tolerance


def golden(name: str) -> dict:
    return torch.load(os.path.join(GOLDEN, f"{name}.pt"), weights_only=False)


def test_golden_embedding():
    g = golden("embed")
    embedder = PatchEmbedder(g["patchsize"], g["pretrain_embed_dimension"], g["target_embed_dimension"])
    out, grid = embedder([g["layer2"], g["layer3"]])
    assert grid == tuple(g["patch_grid"].tolist())
    assert out.shape == g["embedding"].shape
    torch.testing.assert_close(out, g["embedding"], atol=ATOL, rtol=0)


def test_patch_aggregation_equals_unfold_and_adaptive_pooling():
    """The slices-and-means formulation (common.py) gives F.unfold's values exactly and F.adaptive_avg_pool1d's
    to float rounding, for dimensions that divide the channel count and for ones that do not (overlapping bins)."""
    import torch.nn.functional as F

    from common import patch_features, patch_vectors, pool_channels, pool_rows

    x = torch.randn(2, 10, 5, 7, generator=torch.Generator().manual_seed(0))
    for p in (1, 3, 5):
        want = F.unfold(x, kernel_size=p, padding=(p - 1) // 2).reshape(2, 10 * p * p, 5, 7)
        assert torch.equal(patch_vectors(x, p), want)
    vectors = patch_vectors(x, 3)  # [2, 90, 5, 7]
    for dim in (30, 45, 90, 64, 7):
        rows = vectors.permute(0, 2, 3, 1).reshape(-1, 1, 90)
        want = F.adaptive_avg_pool1d(rows, dim).reshape(2, 5, 7, dim).permute(0, 3, 1, 2)
        torch.testing.assert_close(pool_channels(vectors, dim), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(pool_rows(rows[:, 0], dim), want.permute(0, 2, 3, 1).reshape(-1, dim), atol=1e-6, rtol=0)
    for p, c, dim in ((3, 10, 30), (3, 10, 15), (3, 10, 45), (1, 10, 5), (5, 4, 20), (3, 10, 64), (3, 8, 12)):
        # bins of 3 or 6 channels (whole kernel rows: the row-mean path), of 2, of 5x5 rows, overlapping, and 6 of 72
        x = torch.randn(2, c, 6, 5, generator=torch.Generator().manual_seed(p + c + dim))
        want = pool_channels(F.unfold(x, kernel_size=p, padding=(p - 1) // 2).reshape(2, c * p * p, 6, 5), dim)
        torch.testing.assert_close(patch_features(x, p, dim), want, atol=1e-6, rtol=0)


def test_golden_center_initialization():
    g = golden("center")
    center = pbas.initialize_center((b.mean(0) for b in g["projected_batches"]), "cosine")
    torch.testing.assert_close(center, g["center"], atol=ATOL, rtol=0)


def test_vectorised_center_update_equals_sequential_loop():
    torch.manual_seed(0)
    center, a = torch.randn(16, 8), torch.randn(40, 8)
    idx = torch.randint(0, 4, (40,))  # many repeated hits on few rows
    expected = center.clone()
    for j in range(len(a)):
        expected[idx[j]] = 0.9 * expected[idx[j]] + 0.1 * a[j]
    torch.testing.assert_close(pbas.update_center(center, a, idx), expected, atol=1e-6, rtol=0)


def _golden_pbas() -> tuple[dict, pbas.PBAS, list[torch.optim.Optimizer]]:
    g = golden("train_step")
    dim = g["features"].shape[1]
    hidden = g["init"]["discriminator"]["body.block1.0.weight"].shape[0]
    config = pbas.PBASConfig(pretrain_embed_dimension=dim, target_embed_dimension=dim, dsc_hidden=hidden, k=g["k"], lr=g["lr"])
    model = pbas.PBAS(config)
    model.center = g["center"].clone()
    model.projector.load_state_dict(g["init"]["projection"])  # the release's key names load unchanged
    model.discriminator.load_state_dict(g["init"]["discriminator"])
    model.train()
    return g, model, model.make_optimizers()


def _one_step(model, optimizers, feats, labels, positions, noise=None) -> dict:
    """One optimisation step as the engine takes it (engine.train_epoch)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss, stats = model.loss(feats, labels, positions, noise=noise)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return stats


def test_golden_training_step_forward():
    g, model, _ = _golden_pbas()
    u = model.projector(g["features"])
    svdd, fake, idx = model.synthesize(u)
    assert torch.equal(idx, g["nearest_center"])
    torch.testing.assert_close(fake, g["fake"], atol=ATOL, rtol=0)
    torch.testing.assert_close(svdd, g["svdd_loss"], atol=ATOL, rtol=0)
    scores = model.discriminator(torch.cat([u, fake]))
    torch.testing.assert_close(scores, g["scores"], atol=ATOL, rtol=0)
    n = len(u)
    torch.testing.assert_close(F.binary_cross_entropy(scores[:n], torch.zeros_like(scores[:n])), g["true_loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(F.binary_cross_entropy(scores[n:], torch.ones_like(scores[n:])), g["fake_loss"], atol=ATOL, rtol=0)


def test_golden_training_step_updates():
    """Both optimizers' first step. One tensor is special: the Linear bias right before BatchNorm has a true
    gradient of exactly zero (BatchNorm removes any constant shift), so in the reference its update is float
    rounding noise divided by Adam's tiny second moment, which no other implementation can reproduce bit for
    bit. For it we check what is determined: a vanishing gradient and an update within Adam's +-lr bound."""
    g, model, optimizers = _golden_pbas()
    positions = len(g["center"])
    stats = _one_step(model, optimizers, g["features"], torch.zeros(len(g["features"]) // positions, dtype=torch.long), positions)
    for key in ("svdd_loss", "true_loss", "fake_loss"):
        assert stats[key].item() == pytest.approx(g[key].item(), abs=ATOL)
    pre_bn_bias = "body.block1.0.bias"
    for name, module in (("projection", model.projector), ("discriminator", model.discriminator)):
        for key, value in module.state_dict().items():
            expected = g["after"][name][key]
            if name == "discriminator" and key == pre_bn_bias:
                assert model.discriminator.body.block1[0].bias.grad.abs().max() < 1e-6
                step = 2 * g["lr"]  # the discriminator's learning rate
                init = g["init"][name][key]
                assert (value - init).abs().max() <= step * 1.01
                assert (expected - init).abs().max() <= step * 1.01
                continue
            torch.testing.assert_close(value.float(), expected.float(), atol=1e-6, rtol=0, msg=f"{name}.{key}")


# ----------------------------------------------------------------------------------------------
# CRAS (golden/cras_*.pt: the release's CRAS._train_discriminator and CRAS._predict, D = 32, 16 patches, 3 classes)
# ----------------------------------------------------------------------------------------------


def _cras(dim: int, num_classes: int, **config) -> cras.CRAS:
    return cras.CRAS(cras.CRASConfig(pretrain_embed_dimension=dim, target_embed_dimension=dim, **config), num_classes)


def test_golden_cras_center_banks():
    g = golden("cras_center")
    batches = g["embedded_batches"]
    dim = batches[g["classes"][0]][0].shape[-1]
    model = _cras(dim, len(g["classes"]))
    model.projector.load_state_dict(g["projection"])
    positions = batches[g["classes"][0]][0].shape[1]
    model.initialize(lambda c: (b.reshape(-1, dim) for b in batches[g["classes"][c]]), positions)
    torch.testing.assert_close(model.center, g["center_bank"], atol=ATOL, rtol=0)


def _golden_cras_step() -> tuple[dict, cras.CRAS, list[torch.optim.Optimizer]]:
    g = golden("cras_step")
    model = _cras(g["features"].shape[1], len(g["classes"]), k=g["k"], lr=g["lr"], noise=g["noise_std"])
    model.projector.load_state_dict(g["init"]["projection"])
    model.discriminator.load_state_dict(g["init"]["discriminator"])
    model.center = g["center_bank"].clone()
    model.train()
    return g, model, model.make_optimizers()


def test_golden_cras_step_forward():
    g, model, _ = _golden_cras_step()
    positions = g["center_bank"].shape[1]
    x = model.project(g["features"])
    c = model.nearest(x.reshape(len(g["labels"]), positions, -1), g["labels"]).reshape_as(x)
    bank = g["center_bank"][g["labels"]]  # the chosen centers are bank rows at the golden indices
    expected_c = torch.gather(bank, 1, g["nearest_center"].unsqueeze(-1).expand(-1, -1, bank.shape[-1])).reshape_as(x)
    torch.testing.assert_close(c, expected_c, atol=0, rtol=0)
    fake, alpha = model.synthesize(x, c, g["noise"])
    torch.testing.assert_close(alpha, g["scale"], atol=ATOL, rtol=0)
    torch.testing.assert_close(fake, g["fake"], atol=ATOL, rtol=0)


# Parameters whose true gradient is exactly zero: every Linear bias right before a BatchNorm, and the projector's
# bias (a constant shift of x shifts both halves of [x, x - c] and the fake rows alike, which the BatchNorm after
# D's first Linear removes). Their reference update is float rounding noise amplified by Adam: it matches ours
# bit for bit only with the reference's reduction order (it does with 2 CPU threads, not with 1).
CRAS_ZERO_GRADIENT = {("projection", "layers.0fc.bias"): "projector", ("discriminator", "body.block1.0.bias"): "discriminator",
                      ("discriminator", "body.block2.0.bias"): "discriminator"}


def test_golden_cras_step_updates_both_optimizers():
    """AdamW on P and Adam(weight_decay 1e-5) on D after one step with the release's noise draw."""
    g, model, optimizers = _golden_cras_step()
    _one_step(model, optimizers, g["features"], g["labels"], g["center_bank"].shape[1], noise=g["noise"])
    lr = {"projector": g["lr"], "discriminator": 2 * g["lr"]}
    for name, module in (("projection", model.projector), ("discriminator", model.discriminator)):
        state = module.state_dict()
        assert set(state) == set(g["after"][name])
        params = dict(module.named_parameters())
        for key, value in state.items():
            expected, init = g["after"][name][key].float(), g["init"][name][key].float()
            if (name, key) in CRAS_ZERO_GRADIENT:
                assert params[key].grad.abs().max() < 1e-6  # zero up to rounding
                bound = lr[CRAS_ZERO_GRADIENT[(name, key)]] * 1.01  # Adam moves a parameter by at most ~lr
                assert (value - init).abs().max() <= bound and (expected - init).abs().max() <= bound
                continue
            torch.testing.assert_close(value.float(), expected, atol=1e-6, rtol=0, msg=f"{name}.{key}")
            if key.endswith("weight"):  # the step really changed the parameters the golden file changed
                assert torch.equal(value, g["init"][name][key]) == torch.equal(g["after"][name][key], g["init"][name][key])


def test_golden_cras_prediction_with_the_batch_vote():
    g = golden("cras_predict")
    dim = g["features"].shape[1]
    model = _cras(dim, len(g["center_bank"]), imagesize=g["image_size"])
    model.projector.load_state_dict(g["state"]["projection"])
    model.discriminator.load_state_dict(g["state"]["discriminator"])
    model.center = g["center_bank"]
    side = int(round(g["center_bank"].shape[1] ** 0.5))
    scores, maps, _ = model.score(g["features"], (side, side))
    torch.testing.assert_close(scores, g["image_scores"], atol=ATOL, rtol=0)
    torch.testing.assert_close(maps, g["anomaly_maps"], atol=ATOL, rtol=0)


def test_cras_batch_vote_depends_on_the_batch_and_image_vote_does_not():
    """With class_vote 'batch' an image's class (and score) follows its batch's majority; with 'image' it does not."""
    torch.manual_seed(0)
    dim, positions = 8, 4
    model = _cras(dim, 2, imagesize=8)
    model.center = torch.stack([torch.randn(positions, dim) + 3, torch.randn(positions, dim) - 3])
    near = lambda c, n: model.center[c].repeat(n, 1) + 0.01 * torch.randn(n * positions, dim)
    feats = torch.cat([near(0, 1), near(1, 3)])  # one image of class 0 in a batch of three class-1 images
    model.projector = torch.nn.Identity()
    _, _, batch_classes = model.score(feats, (2, 2))
    assert batch_classes.tolist() == [1, 1, 1, 1]
    model.config.class_vote = "image"
    _, _, own = model.score(feats, (2, 2))
    assert own.tolist() == [0, 1, 1, 1]


def test_golden_scoring():
    g = golden("score")
    patch = g["patch_scores"]
    image_scores = patch.flatten(1).max(dim=1).values
    torch.testing.assert_close(image_scores, g["image_scores"], atol=ATOL, rtol=0)
    maps = anomaly_maps(patch, g["image_size"])
    torch.testing.assert_close(maps, g["anomaly_maps"], atol=ATOL, rtol=0)


def test_golden_gaussian_matches_scipy_within_1e5():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    g = golden("score")
    up = F.interpolate(g["patch_scores"].unsqueeze(1), size=(g["image_size"],) * 2, mode="bilinear", align_corners=False)[:, 0]
    ours = gaussian_blur(up)
    ref = torch.stack([torch.from_numpy(scipy_ndimage.gaussian_filter(m.numpy(), sigma=4)) for m in up])
    assert (ours - ref).abs().max() <= 1e-5


def test_golden_pro():
    g = golden("pro")
    value = metrics.pro_released(g["masks"], g["anomaly_maps"])
    assert value == pytest.approx(float(g["pro"]), abs=1e-6)
