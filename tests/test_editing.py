"""Editing maths: regions, component selection (nested in r), swaps (r = 0 exact, r = 1 full), constraints."""

import pytest
import torch
from test_analysis import SHAPES, random_latents, random_propagator, tiny_model

from hkd import editing


def test_region_masks():
    lower = editing.region_mask(5, 4, "lower")
    assert lower.shape == (5, 4) and lower[2:].all() and not lower[:2].any()
    assert torch.equal(editing.region_mask(4, 4, "upper"), ~editing.region_mask(4, 4, "lower"))
    assert torch.equal(editing.region_mask(4, 6, "left"), ~editing.region_mask(4, 6, "right"))
    assert editing.region_mask(3, 3, "all").all()
    with pytest.raises(ValueError, match="region must be one of"):
        editing.region_mask(4, 4, "middle")


def test_component_selection_is_nested_sized_and_inside_band_and_region():
    propagator = random_propagator()
    previous = None
    for r in (0.0, 0.1, 0.5, 0.9, 1.0):
        chosen, _ = editing.component_masks(propagator, "high", "lower", r, seed=3)
        for level, mask in enumerate(chosen):
            band = propagator.band_mask(level, "high")
            region = editing.region_mask(*SHAPES[level][1:], "lower")
            eligible = band & region
            assert not (mask & ~eligible).any()
            assert int(mask.sum()) == round(r * int(eligible.sum()))
            if previous is not None:
                assert not (previous[level] & ~mask).any()  # nested: r grows, the set only grows
        previous = chosen
    with pytest.raises(ValueError, match="fraction r"):
        editing.component_masks(propagator, "high", "lower", 1.5)


@pytest.mark.parametrize("generator,per_position", [("spectral", True), ("spectral", False), ("dense", True)])
def test_swap_r0_is_exact_and_r1_all_bands_everywhere_is_the_reference(generator, per_position):
    propagator = random_propagator(generator, per_position)
    z, z_ref = random_latents(2), random_latents(2)
    chosen, regions = editing.component_masks(propagator, "high", "lower", 0.0)
    for a, b in zip(editing.swap(propagator, z, z_ref, chosen, regions), z, strict=True):
        assert torch.equal(a, b)
    chosen, regions = editing.component_masks(propagator, editing.BAND_ALL, "all", 1.0)
    for a, b in zip(editing.swap(propagator, z, z_ref, chosen, regions), z_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_position", [True, False])
def test_swap_changes_only_the_region_and_the_band(per_position):
    propagator = random_propagator("spectral", per_position)
    z, z_ref = random_latents(2), random_latents(2)
    chosen, regions = editing.component_masks(propagator, "low", "lower", 1.0)
    edited = editing.swap(propagator, z, z_ref, chosen, regions)
    for level, (a, b, r) in enumerate(zip(edited, z, z_ref, strict=True)):
        h = SHAPES[level][1]
        assert torch.equal(a[..., : h // 2, :], b[..., : h // 2, :])  # upper half untouched
        band = propagator.band_mask(level, "low").repeat_interleave(2, dim=0)
        band = band if per_position else band[:, None, None].expand(-1, *SHAPES[level][1:])
        lower = torch.zeros(SHAPES[level][1:], dtype=torch.bool)
        lower[h // 2 :] = True
        swapped = band & lower
        torch.testing.assert_close(a[:, swapped], r[:, swapped], rtol=1e-12, atol=1e-12)
        assert torch.equal(a[:, ~swapped], b[:, ~swapped])


def test_constraints():
    known, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.rand(1, 1, 4, 4) > 0.5
    out = editing.inpaint_constraint(known, mask)(x)
    assert torch.equal(out[..., mask[0, 0]], known[..., mask[0, 0]])
    assert torch.equal(out[..., ~mask[0, 0]], x[..., ~mask[0, 0]])
    gray = torch.randn(2, 1, 4, 4)
    colourise = editing.colourise_constraint(gray)
    out = colourise(x)
    torch.testing.assert_close(out.mean(1, keepdim=True), gray)
    torch.testing.assert_close(colourise(out), out)  # a projection
    torch.testing.assert_close(out - out.mean(1, keepdim=True), x - x.mean(1, keepdim=True))  # chroma kept


def test_blend_times():
    assert editing.blend_times(80.0, 0.002, 1) == [80.0]
    times = editing.blend_times(80.0, 0.002, 4)
    assert times[0] == pytest.approx(80) and len(times) == 4 and times == sorted(times, reverse=True)


@pytest.mark.parametrize("clock", ["identity", "log"])
def test_midpoint_is_half_way_in_the_koopman_clock(clock):
    model = tiny_model(clock=clock)
    expected = (model.T + model.eps) / 2 if clock == "identity" else (model.T * model.eps) ** 0.5
    assert editing.midpoint(model) == pytest.approx(expected, rel=1e-9)


def test_frequency_edit_r0_reproduces_the_unedited_image_and_r1_swaps_the_band():
    model = tiny_model()
    noise, reference = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    result = editing.frequency_edit(model, noise, reference, [0.0, 0.5, 1.0], band="high", region="lower")
    assert torch.equal(result["edited"][0], result["unedited"])  # r = 0: bit for bit
    torch.testing.assert_close(result["unedited"], model.generate(noise), rtol=1e-4, atol=1e-5)
    # r = 1: the band's components in the region come from the reference at t_edit, then the trajectory goes on to
    # eps. (Whether the decoded image shows it depends on the random decoder: checked on the latents, not pixels.)
    t_edit = result["t_edit"]
    z = model.propagate(editing.initial_latents(model, noise), model.T, t_edit)
    z_ref = model.propagate(editing.initial_latents(model, reference), model.T, t_edit)
    swapped = editing.swap(model.propagator, z, z_ref, *editing.component_masks(model.propagator, "high", "lower", 1.0))
    assert any(not torch.equal(a, b) for a, b in zip(swapped, z, strict=True))
    expected = model.decode(model.propagate(swapped, t_edit, model.eps))
    torch.testing.assert_close(result["edited"][2], expected, rtol=1e-5, atol=1e-6)
    everything = editing.frequency_edit(model, noise, reference, [1.0], band="all", region="all")
    torch.testing.assert_close(everything["edited"][0], everything["reference"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="t_edit must lie in"):
        editing.frequency_edit(model, noise, reference, [0.5], t_edit=100.0)


def test_blending_with_everything_known_returns_the_known_image_and_one_step_is_generation():
    model = tiny_model()
    noise, known = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 2 - 1
    everything = editing.blend_along_trajectory(model, noise, editing.inpaint_constraint(known, torch.ones(1)))
    assert torch.equal(everything, known)
    nothing = editing.blend_along_trajectory(model, noise, lambda x: x, steps=1)
    torch.testing.assert_close(nothing, model.generate(noise), rtol=1e-4, atol=1e-5)
    mask = editing.region_mask(8, 8, "upper").float()
    half = editing.blend_along_trajectory(model, noise, editing.inpaint_constraint(known, mask), steps=3)
    assert torch.equal(half[..., :4, :], known[..., :4, :])
    assert not torch.allclose(half[..., 4:, :], known[..., 4:, :])


def test_edit_run_writes_its_figures(tmp_path):
    model = tiny_model(channels=3)
    known = torch.rand(2, 3, 8, 8) * 2 - 1
    written = editing.run(model, tmp_path, num=2, ratios=(0.0, 0.5), known=known, steps=2)
    names = sorted(p.name for p in written)
    assert names == ["colourise.png", "edit.json", "edit_all.png", "edit_high.png", "inpaint.png"]
    assert all(p.stat().st_size > 0 for p in written)
