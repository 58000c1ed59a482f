"""Known-answer tests of the common-corruption suite (Family I)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import stats
from robust_cert.metrics.base import RunContext
from robust_cert.metrics.corruptions import (
    CORRUPTIONS,
    CorruptionAccuracy,
    CorruptionsConfig,
    corrupt,
)

CPU = torch.device("cpu")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 3, 13, 17), (2, 2, 32, 32)])
def test_every_cell_runs_on_any_image_size_and_stays_in_range(shape) -> None:
    x = torch.rand(shape, generator=_g(1))
    for name in CORRUPTIONS:
        for s in range(1, 6):
            a = corrupt(x, name, s, _g(2))
            assert a.shape == x.shape
            assert a.dtype == x.dtype
            assert float(a.min()) >= 0.0
            assert float(a.max()) <= 1.0
            np.testing.assert_array_equal(a.numpy(), corrupt(x, name, s, _g(2)).numpy())
    assert len(CORRUPTIONS) == 15


def test_random_corruptions_depend_on_the_seed_and_severity_grows() -> None:
    x = torch.full((4, 3, 16, 16), 0.5)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "snow",
                 "frost", "fog", "elastic_transform"):
        img = x + 0.3 * torch.rand(x.shape, generator=_g(3))
        assert not torch.equal(corrupt(img, name, 3, _g(0)), corrupt(img, name, 3, _g(1))), name
    noise = [float((corrupt(x, "gaussian_noise", s, _g(0)) - x).std()) for s in range(1, 6)]
    assert noise == sorted(noise)
    assert noise[0] == pytest.approx(0.04, rel=0.05)
    assert noise[4] == pytest.approx(0.10, rel=0.05)


def test_closed_forms() -> None:
    x = torch.rand((3, 1, 9, 9), generator=_g(4))
    # contrast: (x - mean) c + mean, c = 0.15 at severity 5
    m = x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(x, "contrast", 5, _g()), (x - m) * 0.15 + m)
    # brightness on one channel: min(x + 0.3, 1)
    torch.testing.assert_close(corrupt(x, "brightness", 5, _g()), (x + 0.3).clamp(max=1))
    # colour brightness keeps the hue: channel ratios unchanged where nothing saturates
    rgb = torch.rand((2, 3, 5, 5), generator=_g(5)) * 0.5 + 0.1
    b = corrupt(rgb, "brightness", 2, _g())
    torch.testing.assert_close(b / b.amax(1, keepdim=True), rgb / rgb.amax(1, keepdim=True))
    torch.testing.assert_close(b.amax(1), rgb.amax(1) + 0.1)
    # blur, pixelate and JPEG leave a constant image alone (JPEG at the DCT's zero level)
    const = torch.full((2, 3, 12, 10), 128 / 255)
    for name in ("defocus_blur", "motion_blur", "zoom_blur", "pixelate", "jpeg_compression",
                 "glass_blur"):
        for s in (1, 5):
            torch.testing.assert_close(corrupt(const, name, s, _g()), const, atol=1e-5,
                                       rtol=0)
    # shot noise has mean x and variance x / λ (λ = 50 at severity 5)
    mid = torch.full((200, 1, 10, 10), 0.5)
    shot = corrupt(mid, "shot_noise", 5, _g(6))
    assert float(shot.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(shot.var()) == pytest.approx(0.5 / 50, rel=0.05)
    # impulse noise changes about 7% of values to 0 or 1 at severity 5
    imp = corrupt(mid, "impulse_noise", 5, _g(7))
    changed = imp != mid
    assert float(changed.float().mean()) == pytest.approx(0.07, abs=0.01)
    assert set(imp[changed].unique().tolist()) == {0.0, 1.0}


def test_jpeg_is_lossy_and_close() -> None:
    x = torch.rand((2, 3, 16, 16), generator=_g(8))
    y = corrupt(x, "jpeg_compression", 1, _g())
    err1 = float((y - x).abs().mean())
    err5 = float((corrupt(x, "jpeg_compression", 5, _g()) - x).abs().mean())
    assert 0 < err1 < err5 < 0.25


class _Brightness(nn.Module):
    """Class 1 iff the mean pixel value exceeds 0.5."""

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], dim=1)


def _ctx(seed=0, batch_size=16):
    return RunContext(device=CPU, batch_size=batch_size, seed=seed)


def test_metric_known_answers_on_constant_images() -> None:
    v = np.linspace(0.02, 0.98, 49)
    x = np.repeat(v[:, None, None, None], 64, axis=1).reshape(49, 1, 8, 8).astype(np.float32)
    y = (v > 0.5).astype(np.int64)
    y[:3] = 1 - y[:3]  # three mislabelled points
    data = robust_cert.load_data((x, y))
    clf = robust_cert.load_model(_Brightness(), input_shape=(1, 8, 8))
    metric = CorruptionAccuracy(CorruptionsConfig(
        corruptions=["contrast", "brightness", "pixelate", "defocus_blur"], severities=[1, 5]))
    res = metric.run(clf, data, _ctx())
    clean = (v > 0.5).astype(np.int64) == y
    assert res.diagnostics["clean_correct"] == int(clean.sum())
    for c in ("contrast", "pixelate", "defocus_blur"):
        for s in (1, 5):
            assert res.find({"corruption": c, "severity": s}).k == int(clean.sum())
            assert res.diagnostics["mcnemar"][c][str(s)] == {"b": 0, "c": 0, "p_value": 1.0}
    for s, add in ((1, 0.05), (5, 0.3)):
        pred = (np.minimum(v + add, 1) > 0.5).astype(np.int64)
        k = int((pred == y).sum())
        assert res.find({"corruption": "brightness", "severity": s}).k == k
        b = int((clean & (pred != y)).sum())
        c = int((~clean & (pred == y)).sum())
        assert res.diagnostics["mcnemar"]["brightness"][str(s)] == {
            "b": b, "c": c, "p_value": stats.mcnemar_exact(b, c)}
    # the mean over cells, and its gateable randomised-cell proportion
    correct = res.per_point["correct"]
    assert correct.shape == (49, 8)
    assert res.diagnostics["mean_corruption_accuracy"] == pytest.approx(correct.mean())
    mean = res.find({"corruption": "mean"})
    assert mean.n == 49
    assert mean.k == int(correct[np.arange(49), res.per_point["mean_cell"]].sum())
    assert res.status == "ok"
    assert len(res.proportions) == len(metric.selectors()) == 9


def test_metric_is_seeded_and_forward_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x = torch.rand((40, 3, 6, 6), generator=_g(9)).numpy()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = robust_cert.load_data((x, y))
    clf = robust_cert.load_model(model, input_shape=(3, 6, 6))
    metric = CorruptionAccuracy(CorruptionsConfig(corruptions=["gaussian_noise", "snow"],
                                                  severities=[5]))
    assert metric.needs_gradients is False
    a, b = metric.run(clf, data, _ctx(1)), metric.run(clf, data, _ctx(1))
    np.testing.assert_array_equal(a.per_point["correct"], b.per_point["correct"])
    assert a.diagnostics == b.diagnostics
    # tabular data is not applicable
    tab = robust_cert.load_data((np.random.default_rng(0).random((5, 4)), np.zeros(5, int)))
    lin = robust_cert.load_model(nn.Linear(4, 2), input_shape=(4,))
    res = metric.run(lin, tab, _ctx())
    assert res.status == "not_applicable"


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown corruption 'rain'; valid: gaussian_noise"):
        CorruptionsConfig(corruptions=["rain"])
    with pytest.raises(ValueError, match="severities must be in 1..5"):
        CorruptionsConfig(severities=[6])
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt(torch.zeros(1, 1, 4, 4), "fog", 0, _g())


def test_runs_on_a_model_without_gradients() -> None:
    """Forward only: the suite runs on a classifier without input gradients (ONNX)."""
    import dataclasses

    x = torch.rand((12, 1, 8, 8), generator=_g(10)).numpy()
    y = (x.reshape(12, -1).mean(1) > 0.5).astype(np.int64)
    data = robust_cert.load_data((x, y))
    clf = dataclasses.replace(robust_cert.load_model(_Brightness(), input_shape=(1, 8, 8)),
                              differentiable=False, format="onnx")
    res = CorruptionAccuracy(CorruptionsConfig(corruptions=["fog"], severities=[2])).run(
        clf, data, _ctx())
    assert res.status == "ok"
    assert res.find({"corruption": "fog", "severity": 2}).n == 12
