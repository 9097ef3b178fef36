"""vmambax.metrics against medpy's dc/jc/hd95 (the definition) and the empty-mask policy."""
import math

import numpy as np
import pytest
import torch

from vmambax import metrics

medpy_binary = pytest.importorskip("medpy.metric.binary")


def _random_masks(rng, shape):
    # Smoothed noise gives blob-like masks with several components and holes, plus edge contact.
    from scipy import ndimage
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.15
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.15
    return a, b


@pytest.mark.parametrize("seed", range(12))
def test_matches_medpy_on_random_masks_with_anisotropic_spacing(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(8, 70, size=2))
    p, t = _random_masks(rng, shape)
    if not p.any() or not t.any():
        p[0, 0] = t[-1, -1] = True
    spacing = (float(rng.uniform(0.3, 3.0)), float(rng.uniform(0.3, 3.0)))
    assert metrics.dice(p, t) == pytest.approx(medpy_binary.dc(p, t), abs=1e-12)
    assert metrics.iou(p, t) == pytest.approx(medpy_binary.jc(p, t), abs=1e-12)
    assert metrics.hd95(p, t, spacing) == pytest.approx(
        medpy_binary.hd95(p, t, voxelspacing=spacing), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_small_lesions_on_a_large_slice_match_medpy_and_the_whole_slice(seed):
    # hd95 works on the masks' joint bounding box plus one pixel: lesions far apart, at the image's
    # edges and corners, and one-pixel ones must give what medpy and the whole-slice transform give.
    rng = np.random.default_rng(100 + seed)
    p, t = np.zeros((160, 224), bool), np.zeros((160, 224), bool)
    for m in (p, t):
        for _ in range(int(rng.integers(1, 4))):
            r, c = int(rng.integers(0, 160)), int(rng.integers(0, 224))
            h, w = (int(v) for v in rng.integers(0, 12, size=2))
            m[max(r - h, 0):r + h + 1, max(c - w, 0):c + w + 1] = True
    p[0, int(rng.integers(0, 224))] = t[-1, -1] = True          # edge and corner contact
    spacing = (float(rng.uniform(0.3, 3.0)), float(rng.uniform(0.3, 3.0)))
    whole = np.concatenate([metrics._surface_distances(p, t, spacing), metrics._surface_distances(t, p, spacing)])
    assert metrics.hd95(p, t, spacing) == float(np.percentile(whole, 95))
    assert metrics.hd95(p, t, spacing) == pytest.approx(
        medpy_binary.hd95(p, t, voxelspacing=spacing), rel=1e-12, abs=1e-12)


def test_accepts_tensors_and_any_nonzero_value():
    t = torch.zeros(16, 20, dtype=torch.uint8)
    t[3:9, 4:12] = 255
    p = torch.zeros(16, 20)
    p[4:10, 5:12] = 0.7
    pn, tn = p.numpy() != 0, t.numpy() != 0
    assert metrics.dice(p, t) == pytest.approx(medpy_binary.dc(pn, tn))
    assert metrics.hd95(p, t, (2.0, 0.5)) == pytest.approx(medpy_binary.hd95(pn, tn, voxelspacing=(2.0, 0.5)))


def test_empty_policy_ours():
    z = np.zeros((10, 30), bool)
    m = z.copy()
    m[2:5, 3:8] = True
    assert (metrics.dice(z, z), metrics.iou(z, z), metrics.hd95(z, z)) == (1.0, 1.0, 0.0)
    diag = math.hypot(10 * 0.5, 30 * 2.0)
    for a, b in ((z, m), (m, z)):
        assert metrics.dice(a, b) == 0.0 and metrics.iou(a, b) == 0.0
        assert metrics.hd95(a, b, spacing=(0.5, 2.0)) == pytest.approx(diag)
    assert metrics.empty_case(z, z) == "both_empty"
    assert metrics.empty_case(z, m) == "pred_empty" and metrics.empty_case(m, z) == "target_empty"


def test_published_policy_is_available_but_not_default():
    z = np.zeros((9, 9), bool)
    m = z.copy()
    m[0:2, 0:2] = True
    centre = z.copy()
    centre[4, 4] = True
    assert metrics.dice(z, z, policy="published") == 0.0
    assert metrics.hd95(z, m, policy="published") == pytest.approx(medpy_binary.hd95(centre, m))
    assert metrics.hd95(z, m) != metrics.hd95(z, m, policy="published")


def test_confusion_pooled_and_balanced_accuracy():
    p = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    t = np.array([[1, 0, 1, 0], [0, 0, 0, 0]])
    c = metrics.confusion(p, t)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 5)
    assert c.balanced_accuracy == pytest.approx(0.5 * (1 / 2 + 5 / 6))
    pooled = metrics.Confusion()
    pooled += c
    pooled += metrics.confusion(t, t)
    assert pooled.dice == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert math.isnan(metrics.balanced_accuracy(np.zeros((3, 3)), np.zeros((3, 3))))


@pytest.mark.parametrize("bad, match", [
    (dict(pred=np.zeros((2, 3, 3)), target=np.zeros((3, 3))), "pred: expected a 2D mask"),
    (dict(pred=np.zeros((3, 3)), target=np.zeros((3, 4))), "the same shape"),
    (dict(pred=np.ones((3, 3)), target=np.ones((3, 3)), spacing=(1.0, -1.0)), "spacing"),
])
def test_bad_input_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.hd95(**bad)
