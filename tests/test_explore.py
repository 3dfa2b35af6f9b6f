"""`hkd explore`: the explorer's maths against the model's own closed form, the server's one-line errors, and the page
driven in a real headless Chromium (Debian's, through Playwright; nothing downloads a browser)."""

import io
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import sync_playwright
from test_model import TINY, tiny_model

from hkd import analysis, editing, explore
from hkd.cli import main
from hkd.edm import EDMPrecond, heun_sampler
from hkd.model import HKDModel
from hkd.unet import UNet

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]  # fmt: skip
SHAPE = dict(TINY, img_resolution=16)


@pytest.fixture
def model(tmp_path):
    """A tiny random HKDModel, saved and loaded back as `hkd explore` loads it."""
    tiny_model(**SHAPE).save_pretrained(tmp_path / "model")
    return HKDModel.from_pretrained(tmp_path / "model").eval()


def tiny_teacher():
    net = UNet(16, 3, 3, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = EDMPrecond(net).eval().requires_grad_(False)
    teacher.img_resolution, teacher.img_channels = 16, 3
    return teacher


def seed_noise(seed):
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def explorer_latents(model, seed):
    """E(x_T), x_T = T n, n the seed's noise (drawn here as the page's server draws it)."""
    return model.encode(seed_noise(seed) * model.T, model.T)


@torch.no_grad()
def expected(model, seed, t, off=(), latents=None, t_from=None):
    """The model's own output at t, computed here: D(exp((t - T) A) E(x_T)) with the off bands projected out."""
    if latents is None:
        latents, t_from = explorer_latents(model, seed), model.T
    z = model.propagate(latents, t_from, t)
    z = [zl - sum((analysis.project(model.propagator, z, b, l)[l] for ll, b in off if ll == l), 0 * zl)
         for l, zl in enumerate(z)]  # fmt: skip
    return explore.to_uint8(model.decode(z)[0])


def restrict(chosen, regions):
    return [c & r for c, r in zip(chosen, regions, strict=True)]


def serve(explorer):
    server = explore.make_server(explorer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# ---------------------------------------------------------------------------------------------------------------
# The explorer, without a browser


def test_frames_are_the_models_closed_form(model):
    x = explore.Explorer(model)
    for t in [model.T, 3.0, 0.05, model.eps]:
        np.testing.assert_array_equal(explore.to_uint8(x.frame(5, t)), expected(model, 5, t))
    with torch.no_grad():
        one_step = model.generate(x.noise(5))[0]
    torch.testing.assert_close(x.frame(5, model.eps), one_step, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(expected(model, 5, model.T), expected(model, 5, model.eps))
    with pytest.raises(ValueError, match=r"t must lie in \[eps, T\]"):
        x.frame(5, 100.0)


def test_band_view_removes_the_bands_of_hkd_analyze(model):
    x = explore.Explorer(model)
    with torch.no_grad():
        z = x.latents(2, 1.0)
        every = x.view(z, [(l, b) for l in range(x.levels) for b in analysis.BANDS])
        kept = x.view(z, [(0, "low"), (0, "middle")])
    assert all(float(v.abs().max()) < 1e-6 for v in every)  # the bands of a level cover it
    torch.testing.assert_close(kept[0], analysis.project(model.propagator, z, "high", 0)[0])
    torch.testing.assert_close(kept[1:], z[1:])
    info = x.info()
    for level, data in enumerate(info["levels"]):
        masks = [editing.component_masks(model.propagator, b, "all", 1.0)[0][level] for b in analysis.BANDS]
        assert data["counts"] == [int(m.sum()) for m in masks]
        assert sum(data["counts"]) == model.propagator.eigenvalues()[level].numel()


def test_box_masks():
    shapes = [(4, 16, 16), (8, 8, 8), (8, 4, 4)]
    lower = explore.box_masks(shapes, 16, (0, 8, 16, 16))
    for (_, h, w), mask in zip(shapes, lower, strict=True):
        torch.testing.assert_close(mask, editing.region_mask(h, w, "lower"))
    corner = explore.box_masks(shapes, 16, (0, 0, 4, 4))
    assert corner[0].sum() == 16 and corner[1].sum() == 4 and corner[2].sum() == 1
    for bad in [(0, 0, 0, 4), (0, 0, 17, 4), (-1, 0, 4, 4)]:
        with pytest.raises(ValueError, match="box"):
            explore.box_masks(shapes, 16, bad)


def test_edit_is_the_swap_of_hkd_edit_carried_to_eps(model):
    x = explore.Explorer(model)
    t_e = 2.0
    full = x.apply_edit(0, t_e, (0, 0, 16, 16), "all", 1.0, reference_seed=1)
    # every component swapped everywhere: the reference's trajectory from t_e on, the original's before
    torch.testing.assert_close(x.frame(0, 0.1, edit=full), x.frame(1, 0.1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.frame(0, 5.0, edit=full), x.frame(0, 5.0))
    none = x.apply_edit(0, t_e, (0, 8, 16, 16), "high", 0.0, reference_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(none.latents, x.latents(0, t_e), strict=True))  # r = 0 changes nothing
    torch.testing.assert_close(x.frame(0, 0.1, edit=none), x.frame(0, 0.1), rtol=1e-4, atol=1e-5)
    half = x.apply_edit(0, t_e, (0, 8, 16, 16), "high", 0.5, reference_seed=1)
    with torch.no_grad():
        z, z_ref = x.latents(0, t_e), x.latents(1, t_e)
        chosen, _ = editing.component_masks(model.propagator, "high", "all", 0.5)
        regions = [editing.region_mask(h, w, "lower") for _, h, w in model.propagator.level_shapes]
        swapped = editing.swap(model.propagator, z, z_ref, restrict(chosen, regions), regions)
    torch.testing.assert_close(half.latents, swapped)
    assert float((x.frame(0, model.eps, edit=half) - x.frame(0, model.eps)).abs().max()) > 0
    stacked = x.apply_edit(0, 0.5, (0, 0, 8, 16), "all", 1.0, reference_seed=2, base=half)
    torch.testing.assert_close(x.frame(0, 1.0, edit=stacked), x.frame(0, 1.0, edit=half))  # t > 0.5: the first edit
    with pytest.raises(ValueError, match="exactly one reference"):
        x.apply_edit(0, t_e, (0, 0, 16, 16), "high", 0.5)
    with pytest.raises(ValueError, match="fraction r"):
        x.apply_edit(0, t_e, (0, 0, 16, 16), "high", 1.5, reference_seed=1)


def test_read_image_and_bad_uploads():
    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    image = explore.read_image(buffer.getvalue(), 3, 16)
    torch.testing.assert_close(image[0], torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
    assert explore.read_image(buffer.getvalue(), 1, 8).shape == (1, 1, 8, 8)
    for bad, message in [(b"", "empty"), (b"not an image at all", "not an image"), (buffer.getvalue()[:40], "not")]:
        with pytest.raises(ValueError, match=message):
            explore.read_image(bad, 3, 16)


def test_teacher_trajectory_is_computed_once_and_interpolated(model, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return heun_sampler(*args, **kwargs)

    monkeypatch.setattr("hkd.edm.heun_sampler", counting)
    teacher = tiny_teacher()
    x = explore.Explorer(model, teacher)
    times, states = heun_sampler(teacher, x.noise(3), 18, model.eps, model.T)
    for i in [0, 5, 17]:  # on the grid: the teacher's own states
        torch.testing.assert_close(x.teacher_frame(3, float(times[i]), "state").double(),
                                   states[i, 0] / (1 + float(times[i]) ** 2) ** 0.5)  # fmt: skip
    t = float(times[4] + times[5]) / 2
    torch.testing.assert_close(x.teacher_frame(3, t, "state"), (states[4, 0] + states[5, 0]) / 2 / (1 + t**2) ** 0.5)
    with torch.no_grad():
        torch.testing.assert_close(x.teacher_frame(3, float(times[5])).float(), teacher(states[5].float(), times[5])[0])
    assert len(calls) == 1
    wrong = tiny_teacher()
    wrong.img_channels = 1
    with pytest.raises(ValueError, match="the teacher makes"):
        explore.Explorer(model, wrong)


# ---------------------------------------------------------------------------------------------------------------
# The server and the command


def http(url, data=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_server_answers_errors_in_one_line(model, monkeypatch):
    x = explore.Explorer(model)
    server, url = serve(x)
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, headers, body = http(f"{url}/api/frame.png?seed=0&t=3.5")
        assert status == 200 and headers["Content-Type"] == "image/png"
        decoded = np.asarray(Image.open(io.BytesIO(body)))
        np.testing.assert_array_equal(decoded, expected(model, 0, 3.5))
        cases = [
            ("/api/frame.png?seed=0&t=500", 400, "t must lie in"),
            ("/api/frame.png?seed=0", 400, "'t'"),
            ("/api/frame.png?seed=0&t=1&off=7-low", 400, "off"),
            ("/api/frame.png?seed=-3&t=1", 400, "seed"),
            ("/api/frame.png?seed=0&t=1&edit=99", 400, "'99'"),
            ("/api/teacher.png?seed=0&t=1", 400, "--teacher"),
            ("/nowhere", 404, "not found"),
        ]
        for path, code, message in cases:
            status, headers, body = http(url + path)
            answer = json.loads(body)
            assert status == code and message in answer["error"] and "\n" not in answer["error"], (path, answer)
        status, _, body = http(f"{url}/api/frame.png?seed=0&t=1&off=0-low,0-low,1-high")  # a repeated pair: once
        close(np.asarray(Image.open(io.BytesIO(body))), expected(model, 0, 1.0, [(0, "low"), (1, "high")]))
        status, _, body = http(f"{url}/api/upload", b"\x89PNG garbage")
        assert status == 400 and "not an image" in json.loads(body)["error"]
        status, _, body = http(f"{url}/api/edit", b"[1, 2]")
        assert status == 400 and "JSON object" in json.loads(body)["error"]

        def broken(*args, **kwargs):
            raise RuntimeError("something deep\n  File x, line 3")

        monkeypatch.setattr(x, "frame", broken)
        status, _, body = http(f"{url}/api/frame.png?seed=0&t=1")
        assert status == 500 and json.loads(body) == {"error": "internal error: RuntimeError: something deep"}
    finally:
        server.shutdown()
        server.server_close()


def test_cli_errors_are_one_line(tmp_path, model, capsys, monkeypatch):
    def run(*argv):
        code = main(["explore", *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        return lines[0]

    assert "not found" in run("--model", str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    assert "corrupt" in run("--model", str(corrupt))
    monkeypatch.chdir(tmp_path)
    assert "hkd demo" in run()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert "cannot listen on 127.0.0.1" in run("--model", str(tmp_path / "model"), "--port", port)
    from hkd.cli import build_parser

    assert build_parser().parse_args(["explore"]).host == "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------------
# The page, in a real browser

PIXELS = """(img) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d"); g.drawImage(img, 0, 0);
  return Array.from(g.getImageData(0, 0, c.width, c.height).data);
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, model):
    server, url = serve(explore.Explorer(model, tiny_teacher()))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    settle(page)
    yield page
    page.close()
    server.shutdown()
    server.server_close()


def settle(page):
    page.wait_for_function("document.body.dataset.busy === '0'", timeout=60_000)
    assert page.get_by_test_id("error").text_content() == ""


def shown(page, testid="frame") -> tuple[float, np.ndarray]:
    """The t the frame shows and its pixels (H, W, 3), read back from the page through a canvas."""
    frame = page.get_by_test_id(testid)
    rgba = np.array(frame.evaluate(PIXELS), dtype=np.uint8).reshape(16, 16, 4)
    return float(frame.get_attribute("data-t")), rgba[..., :3]


def close(a, b):
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02, (difference.max(), (difference > 0).mean())


def test_page_slider_shows_the_models_frame_at_t(page, model, tmp_path):
    t, first = shown(page)
    assert t == model.T
    close(first, expected(model, 0, t))
    for position in ["400", "1000"]:
        page.get_by_test_id("time-slider").fill(position)
        settle(page)
        t, pixels = shown(page)
        close(pixels, expected(model, 0, t))
    assert t == model.eps and not np.array_equal(pixels, first)  # the frame changed along the way
    t_teacher, teacher_pixels = shown(page, "teacher-frame")
    assert t_teacher == t and teacher_pixels.std() > 0
    page.get_by_test_id("seed").fill("7")
    page.get_by_test_id("seed").dispatch_event("change")
    settle(page)
    close(shown(page)[1], expected(model, 7, model.eps))
    screenshot = tmp_path / "explore.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] >= 1000


def test_page_band_toggle_and_edit(page, model, tmp_path):
    page.get_by_test_id("time-slider").fill("500")
    settle(page)
    scatter = page.get_by_test_id("eigen-scatter-0")
    counts = json.loads(page.evaluate("JSON.stringify(info.levels[0].counts)"))
    assert int(scatter.get_attribute("data-on")) == sum(counts)
    page.get_by_test_id("band-toggle-0-high").uncheck()
    settle(page)
    assert int(scatter.get_attribute("data-on")) == counts[0] + counts[1]
    t, pixels = shown(page)
    close(pixels, expected(model, 0, t, off=[(0, "high")]))
    assert not np.array_equal(pixels, expected(model, 0, t))

    # draw the box with the mouse: model pixels (2, 8) to (14, 16), 16 screen pixels each
    box = page.get_by_test_id("frame").bounding_box()
    page.mouse.move(box["x"] + 2.5 * 16, box["y"] + 8.5 * 16)
    page.mouse.down()
    page.mouse.move(box["x"] + 13.5 * 16, box["y"] + 15.9 * 16, steps=4)
    page.mouse.up()
    assert [int(page.get_by_test_id(f"box-{k}").input_value()) for k in ("x0", "y0", "x1", "y1")] == [2, 8, 14, 16]
    page.get_by_test_id("edit-band").select_option("middle")
    page.get_by_test_id("edit-r").fill("0.6")
    page.get_by_test_id("ref-seed").fill("3")
    page.get_by_test_id("apply-edit").click()
    settle(page)
    t_edit = float(page.get_by_test_id("edit-status").get_attribute("data-t"))
    assert t_edit == t
    with torch.no_grad():
        z, z_ref = (model.propagate(explorer_latents(model, seed), model.T, t_edit) for seed in (0, 3))
        chosen, _ = editing.component_masks(model.propagator, "middle", "all", 0.6)
        regions = explore.box_masks(model.propagator.level_shapes, 16, (2, 8, 14, 16))
        edited = editing.swap(model.propagator, z, z_ref, restrict(chosen, regions), regions)
    close(shown(page)[1], expected(model, 0, t_edit, off=[(0, "high")], latents=edited, t_from=t_edit))
    page.get_by_test_id("time-slider").fill("1000")
    settle(page)
    t, pixels = shown(page)
    close(pixels, expected(model, 0, t, off=[(0, "high")], latents=edited, t_from=t_edit))  # carried to eps

    # downloads: the frame as PNG (enlarged), the trajectory as an animated GIF
    download = lambda testid: page.request.get(urljoin(page.url, page.get_by_test_id(testid).get_attribute("href")))
    png = download("download-png")
    assert "attachment" in png.headers["content-disposition"]
    large = np.asarray(Image.open(io.BytesIO(png.body())))
    np.testing.assert_array_equal(large[::16, ::16], pixels)
    gif = Image.open(io.BytesIO(download("download-gif").body()))
    durations = []
    for index in range(gif.n_frames):  # Pillow merges repeated frames into one of longer duration
        gif.seek(index)
        durations.append(gif.info["duration"])
    assert gif.format == "GIF" and sum(durations) == 120 * explore.GIF_FRAMES and gif.n_frames > 2
    last = np.asarray(gif.convert("RGB"))[::8, ::8][:, :16]  # HKD on the left, the teacher on the right
    assert np.abs(last.astype(int) - pixels.astype(int)).mean() < 8
    page.screenshot(path=str(tmp_path / "explore_edit.png"), full_page=True)


def test_page_upload_reference_and_bad_upload(page, model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a PNG")
    page.get_by_test_id("ref-file").set_input_files(str(bad))
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    message = page.get_by_test_id("error").text_content()
    assert "not an image" in message and "\n" not in message and "Traceback" not in message
    reference = tmp_path / "reference.png"
    pixels = (np.linspace(0, 255, 16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    Image.fromarray(pixels).save(reference)
    page.get_by_test_id("ref-file").set_input_files(str(reference))
    page.wait_for_function("document.getElementById('error').textContent === ''")
    settle(page)
    page.get_by_test_id("time-slider").fill("300")
    settle(page)
    page.get_by_test_id("edit-band").select_option("all")
    page.get_by_test_id("edit-r").fill("1")
    page.get_by_test_id("apply-edit").click()
    settle(page)
    t, shown_pixels = shown(page)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = model.propagate(explorer_latents(model, 0), model.T, t)
        z_ref = model.encode(image + t * seed_noise(0), t)
        regions = explore.box_masks(model.propagator.level_shapes, 16, (0, 8, 16, 16))  # the default: lower half
        chosen, _ = editing.component_masks(model.propagator, "all", "all", 1.0)
        edited = editing.swap(model.propagator, z, z_ref, restrict(chosen, regions), regions)
    close(shown_pixels, expected(model, 0, t, latents=edited, t_from=t))
