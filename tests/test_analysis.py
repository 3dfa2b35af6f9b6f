"""Spectral analysis maths: power spectra of known images, band projections partition the latents, rewinding."""

import math

import pytest
import torch

from hkd import analysis
from hkd.model import HKDModel, ModelConfig
from hkd.propagator import HKDPropagator

SHAPES = [(6, 8, 8), (4, 4, 4)]


def random_propagator(generator="spectral", per_position=True):
    propagator = HKDPropagator(SHAPES, generator=generator, per_position=per_position)
    with torch.no_grad():
        for p in propagator.parameters():
            p.normal_()
    return propagator


def tiny_model(clock="identity", channels=1, **config):
    """A tiny HKD model with random generators and a non-zero output layer (so that decodes differ)."""
    model = HKDModel(
        ModelConfig(
            img_resolution=8, img_channels=channels, model_channels=8, channel_mult=(1, 2), clock=clock, **config
        )
    )
    with torch.no_grad():
        for p in model.propagator.parameters():
            p.normal_(0, 0.05)
        model.net.out_conv.weight.normal_(0, 0.3)
    return model.eval()


def random_latents(batch=3):
    return [torch.randn(batch, *shape, dtype=torch.float64) for shape in SHAPES]


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_power_spectrum_of_a_sinusoid_peaks_at_its_frequency(size):
    h, w = size
    k = int(torch.randint(1, min(h, w) // 2, ()))
    phase = float(torch.rand(())) * 2 * math.pi
    x = torch.arange(w, dtype=torch.float64)
    image = torch.cos(2 * math.pi * k * x / w + phase).expand(2, 1, h, w)
    spectrum = analysis.radial_power_spectrum(image)
    assert spectrum.shape == (min(h, w) // 2 + 1,)
    assert int(spectrum.argmax()) == k
    assert spectrum[0] == pytest.approx(0, abs=1e-20)  # no mean
    others = torch.cat([spectrum[:k], spectrum[k + 1 :]])
    assert others.max() < 1e-20 * spectrum[k]  # an integer frequency: all the power sits at radius k
    summary = analysis.spectrum_summary(spectrum)
    assert summary["centroid"] == pytest.approx(k, rel=1e-9)


def test_power_spectrum_of_a_constant_is_dc_only_and_white_noise_is_flat():
    c = float(torch.randn(()))
    spectrum = analysis.radial_power_spectrum(torch.full((1, 1, 8, 8), c))
    assert spectrum[0] == pytest.approx(c * c * 64) and spectrum[1:].abs().max() < 1e-20
    noise = analysis.radial_power_spectrum(torch.randn(400, 1, 16, 16, dtype=torch.float64))
    assert noise[1:].min() > 0.8 and noise[1:].max() < 1.2  # E|FFT|^2 / (HW) = 1 at every frequency


@pytest.mark.parametrize("generator", ["spectral", "dense"])
def test_band_projections_partition_the_latents(generator):
    propagator = random_propagator(generator)
    z = random_latents()
    parts = [analysis.project(propagator, z, band) for band in analysis.BANDS]
    for level in range(len(SHAPES)):
        total = sum(p[level] for p in parts)
        torch.testing.assert_close(total, z[level], rtol=1e-9, atol=1e-9)
        masks = [propagator.band_mask(level, b) for b in analysis.BANDS]
        assert torch.equal(sum(m.long() for m in masks), torch.ones_like(masks[0], dtype=torch.long))
        # the low band holds the smallest real parts
        real = propagator.eigenvalues()[level].real
        assert real[masks[0]].max() <= real[masks[1]].min() <= real[masks[1]].max() <= real[masks[2]].min()
    for band in analysis.BANDS:
        removed = analysis.without(propagator, z, band)
        kept = analysis.project(propagator, z, band)
        for a, b, c in zip(removed, kept, z, strict=True):
            torch.testing.assert_close(a + b, c)


def test_single_level_projection_leaves_the_other_levels_alone():
    propagator = random_propagator()
    z = random_latents()
    out = analysis.project(propagator, z, "high", level=1)
    assert out[0] is z[0]
    assert not torch.equal(out[1], z[1])


def test_rewind_is_the_identity_at_eps_and_follows_the_band():
    propagator = random_propagator()
    z_T = random_latents()
    z_eps = propagator(z_T, -1.0)
    for band in analysis.BANDS:
        same = analysis.rewind(propagator, z_eps, z_eps, band)
        assert all(torch.equal(a, b) for a, b in zip(same, z_eps, strict=True))
    # rewinding every band gives back z_T
    rewound = z_eps
    for band in analysis.BANDS:
        rewound = analysis.rewind(propagator, rewound, z_T, band)
    for a, b in zip(rewound, z_T, strict=True):
        torch.testing.assert_close(a, b)


def test_default_times_run_from_T_to_eps():
    times = analysis.default_times(80.0, 0.002, 7)
    assert times[0] == pytest.approx(80) and times[-1] == pytest.approx(0.002)
    assert bool((times[1:] < times[:-1]).all())


def test_analyze_writes_every_figure_and_table(tmp_path):
    model = tiny_model()
    summary = analysis.analyze(model, torch.randn(2, 1, 8, 8), tmp_path, num_times=4)
    names = {p.split("/")[-1] for p in summary["written"]}
    expected = {"eigenvalues.png", "eigenvalue_maps.png", "bands.png", "band_contributions.png", "cumulative.png"}
    expected |= {"power_spectrum_alpha.png", "power_spectrum_rate.png"}  # the bands' spectra under both readings
    assert expected | {"cumulative_decodes.png", "power_spectrum.png", "analysis.md", "analysis.json"} == names
    assert all((tmp_path / name).stat().st_size > 0 for name in names)
    for band in analysis.BANDS:  # progress runs from 0 at T to 1 at eps
        progress = summary["cumulative"][band]
        assert progress[0] == pytest.approx(0, abs=1e-6) and progress[-1] == pytest.approx(1, abs=1e-6)
    assert "high decode" in (tmp_path / "analysis.md").read_text()


def test_band_images_keep_bands_and_contributions_add_up():
    model = tiny_model()
    noise = torch.randn(2, 1, 8, 8)
    images = analysis.band_images(model, noise)
    torch.testing.assert_close(images["full"][""], model.generate(noise), rtol=1e-4, atol=1e-5)
    z = model.propagate(analysis.initial_latents(model, noise), model.T, model.eps)
    high = model.decode(analysis.project(model.propagator, z, "high"))
    torch.testing.assert_close(images["decode"]["high/all"], high)
    assert not torch.allclose(images["decode"]["high/all"], images["decode"]["low/all"])


@pytest.mark.parametrize("generator", ["spectral", "dense"])
def test_band_readings_cut_on_alpha_or_on_the_rotation_rate(generator):
    propagator = random_propagator(generator)
    eig = propagator.eigenvalues()[0]
    for reading, value in (("alpha", eig.real), ("rate", eig.imag.abs())):
        masks = [propagator.band_mask(0, band, reading=reading) for band in analysis.BANDS]
        assert sum(m.long() for m in masks).eq(1).all()  # a partition
        parts = [value[m] for m in masks if m.any()]  # a band can be empty: ties (real dense eigenvalues) share one
        assert all(lo.max() <= hi.min() for lo, hi in zip(parts, parts[1:], strict=False))
    with pytest.raises(ValueError, match="reading"):
        propagator.band_mask(0, "low", reading="frequency")


def test_band_correspondence_reports_each_reading():
    model = tiny_model()
    result = analysis.band_correspondence(model, torch.randn(2, 1, 8, 8))
    assert set(result) == {"alpha", "rate"}
    for r in result.values():
        assert r["spread"] == pytest.approx(r["high"]["centroid"] - r["low"]["centroid"])
        assert r["contribution_spread"] == pytest.approx(
            r["high"]["contribution_centroid"] - r["low"]["contribution_centroid"]
        )
        assert all(0 <= r[b]["centroid"] <= 4 for b in analysis.BANDS)
