"""`hkd explore` frame latency: how long a frame takes after the time slider moves, side by side with the baseline
that re-encodes x_T for every frame (model.trajectory(noise, [t])), in one run, as ratios.

    python benchmarks/bench_explore.py [--model DIR] [--threads 2] [--frames 60] [--no-browser]

On a shared CPU, `OMP_WAIT_POLICY=passive`: spinning OpenMP threads of busy cores inflate times. --screenshot PNG
[--teacher T] also saves the page after an edit, with one band off (see screenshot()): the README's picture.

Rows (milliseconds per frame, wall clock, median and 90th percentile over `frames` slider positions from T to eps):
* baseline: D(exp((t - T) A) E(x_T)) with E(x_T) recomputed each time (model.trajectory);
* frame: Explorer.frame, E(x_T) cached: one elementwise propagation per level and one decoder pass;
* frame, 2 bands off: the same with two (level, band) pairs projected out (hkd.analysis.project);
* frame + PNG: what the server computes for /api/frame.png;
* HTTP: a GET of /api/frame.png from the server on 127.0.0.1 (urllib; everything but the browser);
* browser: in headless Chromium (Debian's /usr/bin/chromium), from the slider's input event to the new frame's
  load event, measured in the page (performance.now()).

Without --model the model has the digits demo's shape (hkd/configs/digits.yaml: 16x16, 1 channel, model_channels 16,
channel_mult 1 2 2, one block) with random weights and generators: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch

from hkd import explore
from hkd.model import HKDModel, ModelConfig

DIGITS = dict(img_resolution=16, img_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1)
CHROMIUM = Path("/usr/bin/chromium")
SLIDER_TIMING = """async (position) => {
  const slider = document.querySelector('[data-testid=time-slider]');
  const start = performance.now();
  slider.value = String(position);
  slider.dispatchEvent(new Event('input'));
  while (document.body.dataset.busy !== '0') await new Promise((resolve) => setTimeout(resolve, 0));
  return performance.now() - start;
}"""


def digits_model() -> HKDModel:
    model = HKDModel(ModelConfig(**DIGITS))
    scale = 2 / abs(float(model.tau(model.T, model.eps)))
    with torch.no_grad():
        for p in model.propagator.parameters():
            p.normal_(0, scale)
    return model.eval()


def timed_ms(fn, args_list) -> list[float]:
    fn(args_list[0])  # warm-up
    out = []
    for args in args_list:
        start = time.perf_counter()
        fn(args)
        out.append(1e3 * (time.perf_counter() - start))
    return out


def launch(playwright):
    args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)


def browser_ms(url: str, positions: list[int]) -> list[float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.body.dataset.busy === '0'", timeout=120_000)
        page.evaluate(SLIDER_TIMING, positions[0])  # warm-up
        out = [page.evaluate(SLIDER_TIMING, p) for p in positions]
        browser.close()
    return out


def screenshot(url: str, path: str) -> None:
    """The page for seed 3: a high-band edit (r = 0.9, lower half, reference seed 1) at slider position 600, then
    the slider at eps and level 0's high band switched off."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 760})
        idle = lambda: page.wait_for_function("document.body.dataset.busy === '0'", timeout=120_000)
        page.goto(url)
        idle()
        page.get_by_test_id("seed").fill("3")
        page.get_by_test_id("seed").dispatch_event("change")
        idle()
        page.get_by_test_id("time-slider").fill("600")
        idle()
        page.get_by_test_id("edit-r").fill("0.9")
        page.get_by_test_id("apply-edit").click()
        idle()
        page.get_by_test_id("time-slider").fill("1000")
        page.get_by_test_id("band-toggle-0-high").uncheck()
        idle()
        page.screenshot(path=path, full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HKD model folder (default: the digits demo's shape, random weights)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--frames", type=int, default=60, help="slider positions timed per row (default 60)")
    parser.add_argument("--no-browser", action="store_true", help="skip the headless Chromium row")
    parser.add_argument("--screenshot", help="also save a screenshot of the page to this PNG file")
    parser.add_argument("--teacher", help="a teacher to show beside the model in the screenshot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = HKDModel.from_pretrained(args.model).eval() if args.model else digits_model()
    explorer = explore.Explorer(model)
    positions = [round(1000 * i / (args.frames - 1)) for i in range(args.frames)]
    times = [model.T * math.exp(p / 1000 * math.log(model.eps / model.T)) for p in positions]
    noise = explorer.noise(0)
    off = [(0, "high"), (len(model.propagator.level_shapes) - 1, "low")]

    rows = {}
    with torch.no_grad():
        rows["baseline: re-encode x_T each frame"] = timed_ms(lambda t: model.trajectory(noise, [t]), times)
    rows["frame (E(x_T) cached)"] = timed_ms(lambda t: explorer.frame(0, t), times)
    rows["frame, 2 bands off"] = timed_ms(lambda t: explorer.frame(0, t, off), times)
    rows["frame + PNG"] = timed_ms(lambda t: explore.png_bytes(explorer.frame(0, t)), times)
    server = explore.make_server(explorer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rows["HTTP GET /api/frame.png"] = timed_ms(
        lambda t: urllib.request.urlopen(f"{url}/api/frame.png?seed=0&t={t!r}").read(), times
    )
    if not args.no_browser and CHROMIUM.exists():
        rows["browser: slider input -> frame loaded"] = browser_ms(url, positions)
    server.shutdown()
    if args.screenshot:
        from hkd.teacher import load_teacher

        teacher = load_teacher(args.teacher) if args.teacher else None
        server = explore.make_server(explore.Explorer(model, teacher), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        screenshot(f"http://127.0.0.1:{server.server_address[1]}", args.screenshot)
        server.shutdown()

    name = args.model or "digits shape, random weights"
    shape = f"{model.img_channels}x{model.img_resolution}x{model.img_resolution}, {model.propagator.level_shapes}"
    print(f"hkd explore frame latency: model {name} ({shape}), {args.threads} threads, {args.frames} positions\n")
    print("| row | median ms | p90 ms | median / baseline |")
    print("|---|---:|---:|---:|")
    base = statistics.median(rows["baseline: re-encode x_T each frame"])
    for name, ms in rows.items():
        median, p90 = statistics.median(ms), statistics.quantiles(ms, n=10)[-1]
        print(f"| {name} | {median:.2f} | {p90:.2f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
