"""`hkd explore`: the Koopman trajectory of a trained HKD model in the browser (a local web app).

One page (hkd/explore.html, plain HTML and JavaScript) talks to a small standard-library HTTP server. Every frame is
the closed form of the method, with no ODE solve:

    x(t) = D(exp((t - T) A) E(x_T)),   x_T = T n,  n ~ N(0, I) drawn from the seed,

E(x_T) cached per seed, so a frame costs one elementwise propagation per level (spectral generators) and one decoder
pass. On top of the trajectory:

* band toggles: a (level, band) switched off is removed from the latents before decoding, with the bands of
  `hkd analyze` (hkd.analysis.project); the eigenvalue scatter colours the components by band
  (hkd.editing.component_masks with r = 1, region "all").
* edits: the frequency-targeted swap of `hkd edit` (hkd.editing.component_masks and swap), at the current time t_e,
  inside a box, from a reference (a second seed's latents at t_e, or an uploaded image noised to t_e and encoded
  there); frames at t <= t_e carry the edited latents on: D(exp((t - t_e) A) z'). Edits stack.
* the teacher, with --teacher: its Heun trajectory from the same noise, computed once per seed and cached; a frame
  at t interpolates linearly in t between the two grid states around t (x_t, or the teacher's denoised estimate).
* downloads: the frame as PNG, the trajectory (times from T to eps, log-spaced) as an animated GIF.

The server binds 127.0.0.1 unless told otherwise and answers only its own page (hkd.web: Host, Origin and
Sec-Fetch-Site checked, 403 otherwise; bodies bounded in size and time; every value parsed strictly). Every error is
one line of JSON ({"error": ...}), never a traceback page, and the console gets at most one line per failed request.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import sys
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hkd import analysis, editing, web

DEMO_MODEL = Path("runs/demo/hkd/model")
PAGE = "explore.html"
MAX_UPLOAD_BYTES = 10 * 2**20
MAX_EDIT_BYTES = 2**16  # an /api/edit request (a small JSON object)
MAX_SEED = 2**63 - 1
SOCKET_TIMEOUT = 10.0  # seconds one read from or write to a client may wait
BODY_DEADLINE = 30.0  # seconds a whole request body may take to arrive
HEAD_DEADLINE = 30.0  # seconds the request line and headers may take (a trickle of header lines included)
MAX_CONNECTIONS = 32  # open at once (a browser keeps about 6 per server); more are answered 503 at once
PAGE_PATHS = ("/", "/index.html")
EDIT_FIELDS = {"seed", "t", "box", "band", "r", "reference", "base"}
MAX_SCATTER_POINTS = 3000  # per level, for the page's eigenvalue scatter
GIF_FRAMES = 24
TEACHER_VIEWS = ("denoised", "state")


def default_model(explicit: str | None) -> Path:
    """--model, or the demo's model when it exists; otherwise an error that says how to get one."""
    if explicit is not None:
        return Path(explicit)
    if DEMO_MODEL.is_dir():
        return DEMO_MODEL
    raise FileNotFoundError(
        f"no --model given and no demo model at {DEMO_MODEL}: pass --model DIR (a folder written by `hkd train`), "
        "or run `hkd demo` (about 10 minutes on 2 CPU cores) to train one"
    )


def to_uint8(image: Tensor) -> np.ndarray:
    """An image (C, H, W) in [-1, 1] as uint8 (H, W) or (H, W, 3): the mapping of hkd.image_grid.save_grid."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def png_bytes(image: Tensor, scale: int = 1) -> bytes:
    pixels = to_uint8(image).repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def box_masks(level_shapes, resolution: int, box: tuple[int, int, int, int]) -> list[Tensor]:
    """Per level, the (h, w) cells whose centre lies in the pixel box (x0, y0, x1, y1), x1 and y1 exclusive."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
        raise ValueError(f"the box (x0, y0, x1, y1) must satisfy 0 <= x0 < x1 <= {resolution}, same for y; got {box}")
    masks = []
    for _, h, w in level_shapes:
        rows = (torch.arange(h) + 0.5) * resolution / h
        cols = (torch.arange(w) + 0.5) * resolution / w
        masks.append(((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
    return masks


def read_image(data: bytes, channels: int, resolution: int) -> Tensor:
    """An uploaded image file as (1, channels, resolution, resolution) in [-1, 1]; ValueError if it is not one."""
    if not data:
        raise ValueError("the upload is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the upload is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((resolution, resolution), Image.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"the upload is not an image Pillow can read ({type(error).__name__})") from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).reshape(resolution, resolution, -1)
    return (pixels.permute(2, 0, 1)[None] / 127.5 - 1).contiguous()


class Edit:
    """Latents z' at time t (edited), and the edit below it (None: the plain trajectory) for times after t."""

    def __init__(self, seed: int, t: float, latents: list[Tensor], base: Edit | None):
        self.seed, self.t, self.latents, self.base = seed, t, latents, base


class Explorer:
    """The model's trajectory for the page: frames, band views, edits, the teacher's trajectory, downloads.

    Thread-safe: one computation at a time (the server handles requests in threads)."""

    def __init__(self, model, teacher=None, *, teacher_steps: int = 18, cache: int = 16):
        self.model, self.teacher, self.teacher_steps, self.cache = model.eval(), teacher, teacher_steps, cache
        self.device = next(model.parameters()).device
        self.propagator = model.propagator
        self.levels = len(self.propagator.level_shapes)
        if teacher is not None:
            ours = (model.img_channels, model.img_resolution)
            theirs = (getattr(teacher, "img_channels", None), getattr(teacher, "img_resolution", None))
            if ours != theirs:
                raise ValueError(f"the teacher makes (channels, resolution) {theirs}, the model {ours}")
        self.lock = threading.Lock()
        self._latents, self._teacher = OrderedDict(), OrderedDict()  # seed -> E(x_T); seed -> Heun trajectory
        self.edits, self.uploads = OrderedDict(), OrderedDict()  # id -> Edit; id -> image (1, C, H, W)
        self._next_id = 0

    # The trajectory ------------------------------------------------------------------------------------------------

    def check_time(self, t: float) -> float:
        t = float(t)
        if not self.model.eps <= t <= self.model.T:
            raise ValueError(f"t must lie in [eps, T] = [{self.model.eps}, {self.model.T}], got {t}")
        return t

    def noise(self, seed: int) -> Tensor:
        """Standard normal noise (1, C, H, W) of `seed`, drawn on the CPU (the same on every device)."""
        m, seed = self.model, int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"the seed must be an integer in [0, 2^63), got {seed}")
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(1, m.img_channels, m.img_resolution, m.img_resolution, generator=generator).to(self.device)

    def initial_latents(self, seed: int) -> list[Tensor]:
        """E(x_T) for the seed's noise, cached."""
        return self._cached(self._latents, int(seed), lambda: analysis.initial_latents(self.model, self.noise(seed)))

    def latents(self, seed: int, t: float, edit: Edit | None = None) -> list[Tensor]:
        """The Koopman state at t: exp((t - T) A) E(x_T), or the edit's latents carried on from its time."""
        while edit is not None and t > edit.t:
            edit = edit.base
        if edit is None:
            return self.model.propagate(self.initial_latents(seed), self.model.T, t)
        return self.model.propagate(edit.latents, edit.t, t)

    def view(self, latents: list[Tensor], off) -> list[Tensor]:
        """The latents with every (level, band) in `off` removed (the bands of `hkd analyze`)."""
        out = list(latents)
        for level, band in off:
            out[level] = out[level] - analysis.project(self.propagator, latents, band, level)[level]
        return out

    @torch.no_grad()
    def frame(self, seed: int, t: float, off=(), edit: Edit | None = None) -> Tensor:
        """The decoded state at t (C, H, W): D(view(z_t))."""
        t = self.check_time(t)
        with self.lock:
            x_T = self.noise(seed) * self.model.T  # the teacher's skip term, where the model keeps it
            return self.model.decode(self.view(self.latents(seed, t, edit), off), x_T)[0]

    # Editing -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply_edit(
        self,
        seed: int,
        t: float,
        box: tuple[int, int, int, int],
        band: str,
        r: float,
        *,
        reference_seed: int | None = None,
        reference_image: Tensor | None = None,
        base: Edit | None = None,
        ranking_seed: int = 0,
    ) -> Edit:
        """`hkd edit`'s swap z' = z + P_S (z_ref - z) at time t, S = a fraction r of the band's components inside
        the box (editing.component_masks' nested ranking over all positions, restricted to the box)."""
        t = self.check_time(t)
        if band not in (*analysis.BANDS, editing.BAND_ALL):
            raise ValueError(f"band must be one of {(*analysis.BANDS, editing.BAND_ALL)}, got {band!r}")
        if (reference_seed is None) == (reference_image is None):
            raise ValueError("give exactly one reference: a second seed or an uploaded image")
        if base is not None and base.seed != seed:
            raise ValueError(f"the edit to build on belongs to seed {base.seed}, not {seed}")
        m = self.model
        regions = box_masks(self.propagator.level_shapes, m.img_resolution, box)
        with self.lock:
            z = self.latents(seed, t, base)
            if reference_seed is not None:
                z_ref = self.latents(reference_seed, t)
            else:  # the image noised to t with the reference noise of seed 0, encoded there
                z_ref = m.encode(reference_image.to(self.device) + t * self.noise(0), t)
            chosen, _ = editing.component_masks(self.propagator, band, "all", r, seed=ranking_seed)
            if self.propagator.per_position:
                chosen = [c & where.to(c.device) for c, where in zip(chosen, regions, strict=True)]
            regions = [where.to(self.device) for where in regions]
            edit = Edit(seed, t, editing.swap(self.propagator, z, z_ref, chosen, regions), base)
            self.edits[self._new_id()] = edit
            while len(self.edits) > 64:
                self.edits.popitem(last=False)
        return edit

    def edit_id(self, edit: Edit) -> str:
        return next(key for key, value in self.edits.items() if value is edit)

    def upload(self, data: bytes) -> str:
        image = read_image(data, self.model.img_channels, self.model.img_resolution)
        with self.lock:
            key = self._new_id()
            self.uploads[key] = image
            while len(self.uploads) > 16:
                self.uploads.popitem(last=False)
        return key

    # The teacher ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_trajectory(self, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """(times, states, denoised estimates) of the teacher's Heun trajectory from the seed's noise, cached."""
        from hkd.edm import heun_sampler

        def compute():
            m = self.model
            times, states = heun_sampler(self.teacher, self.noise(seed), self.teacher_steps, m.eps, m.T)
            pairs = zip(states[:-1], times[:-1], strict=True)
            denoised = [self.teacher(x.float(), s.float()).double() for x, s in pairs]
            return times, states, torch.stack([*denoised, states[-1]])

        return self._cached(self._teacher, int(seed), compute)

    def teacher_frame(self, seed: int, t: float, view: str = "denoised") -> Tensor:
        """The teacher's x_t ("state") or D(x_t; t) ("denoised") at t, linear in t between its grid times."""
        if self.teacher is None:
            raise ValueError("no teacher: start hkd explore with --teacher")
        if view not in TEACHER_VIEWS:
            raise ValueError(f"view must be one of {TEACHER_VIEWS}, got {view!r}")
        t = self.check_time(t)
        with self.lock:
            times, states, denoised = self.teacher_trajectory(seed)
        images = states if view == "state" else denoised
        i = int(torch.searchsorted(-times[:-1].cpu(), torch.tensor(-t, dtype=times.dtype), right=True)) - 1
        i = min(max(i, 0), len(times) - 2)
        w = float((times[i] - t) / (times[i] - times[i + 1]))
        image = (1 - w) * images[i, 0] + w * images[i + 1, 0]
        return image / math.sqrt(1 + t**2) if view == "state" else image  # x_t: scaled to unit variance for display

    # Downloads -----------------------------------------------------------------------------------------------------

    def trajectory_gif(self, seed: int, off=(), edit: Edit | None = None, *, scale: int = 8) -> bytes:
        """The frames at GIF_FRAMES times from T to eps (log-spaced), the teacher's beside them, as an animated GIF."""
        pictures = []
        for t in analysis.default_times(self.model.T, self.model.eps, GIF_FRAMES).tolist():
            t = min(max(t, self.model.eps), self.model.T)
            row = [self.frame(seed, t, off, edit)]
            if self.teacher is not None:
                row.append(self.teacher_frame(seed, t).to(row[0]))
            pixels = to_uint8(torch.cat(row, dim=-1)).repeat(scale, axis=0).repeat(scale, axis=1)
            pictures.append(Image.fromarray(pixels))  # RGB: Pillow picks an adaptive palette per frame
        buffer = io.BytesIO()
        pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=120, loop=0)
        return buffer.getvalue()

    # The page's data -----------------------------------------------------------------------------------------------

    def info(self) -> dict:
        """What the page draws: times, levels, bands, the eigenvalues (alpha, beta) with each one's band."""
        band_masks = {
            band: editing.component_masks(self.propagator, band, "all", 1.0)[0] for band in analysis.BANDS
        }  # fmt: skip
        levels = []
        for level, eigen in enumerate(self.propagator.eigenvalues()):
            band_of = torch.full(eigen.shape, -1, dtype=torch.long)
            for index, band in enumerate(analysis.BANDS):
                band_of[band_masks[band][level].cpu()] = index
            stride = max(1, -(-eigen.numel() // MAX_SCATTER_POINTS))
            flat, bands = eigen.flatten().cpu()[::stride], band_of.flatten()[::stride]
            counts = [int((band_of == index).sum()) for index in range(len(analysis.BANDS))]
            levels.append(
                {
                    "shape": list(self.propagator.level_shapes[level]),
                    "alpha": [round(v, 6) for v in flat.real.tolist()],
                    "beta": [round(v, 6) for v in flat.imag.tolist()],
                    "band": bands.tolist(),
                    "counts": counts,
                }
            )
        m = self.model
        return {
            "T": m.T,
            "eps": m.eps,
            "resolution": m.img_resolution,
            "channels": m.img_channels,
            "bands": list(analysis.BANDS),
            "edit_bands": [*analysis.BANDS, editing.BAND_ALL],
            "levels": levels,
            "generator": self.propagator.generator,
            "teacher": self.teacher is not None,
            "teacher_views": list(TEACHER_VIEWS),
        }

    # Helpers -------------------------------------------------------------------------------------------------------

    def _cached(self, store: OrderedDict, key, compute):
        if key in store:
            store.move_to_end(key)
            return store[key]
        value = store[key] = compute()
        while len(store) > self.cache:
            store.popitem(last=False)
        return value

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP server


def parse_off(text: str, levels: int) -> list[tuple[int, str]]:
    """Parse "0-low,1-high" -> [(0, "low"), (1, "high")]: the (level, band) pairs switched off."""
    off = []
    for item in filter(None, text.split(",")):
        level, _, band = item.partition("-")
        if not web.INTEGER.fullmatch(level) or not int(level) < levels or band not in analysis.BANDS:
            raise ValueError(
                f"off: {web.quote(item)} is not LEVEL-BAND with LEVEL < {levels} and BAND in {analysis.BANDS}"
            )
        off.append((int(level), band))
    return list(dict.fromkeys(off))  # each pair once


def edit_arguments(x: Explorer, request: dict) -> dict:
    """Explorer.apply_edit's arguments from the page's JSON request, each field of its exact type."""
    reference, base = request.get("reference", {}), request.get("base")
    if type(reference) is not dict or len(reference) != 1 or not set(reference) <= {"seed", "upload"}:
        raise ValueError(f'reference must be {{"seed": INTEGER}} or {{"upload": ID}}, got {web.quote(reference)}')
    arguments = {
        "seed": web.json_integer(request.get("seed", 0), "seed", 0, MAX_SEED),
        "t": web.json_number(request["t"], "t"),
        "box": web.json_integers(request["box"], "box", 4, 0, x.model.img_resolution),
        "band": web.json_string(request["band"], "band"),
        "r": web.json_number(request["r"], "r"),
        "base": None if base is None else x.edits[web.json_string(base, "base")],
    }
    if "seed" in reference:
        arguments["reference_seed"] = web.json_integer(reference["seed"], "the reference seed", 0, MAX_SEED)
    else:
        arguments["reference_image"] = x.uploads[web.json_string(reference["upload"], "the reference upload")]
    return arguments


class Handler(BaseHTTPRequestHandler):
    server_version = "hkd-explore"
    timeout = SOCKET_TIMEOUT  # every socket read and write: a silent client cannot hold a thread for long
    explorer: Explorer  # set on the subclass that make_server builds
    address: web.Address  # likewise

    def setup(self):
        super().setup()
        self.expired = False
        self.expiry = threading.Timer(HEAD_DEADLINE, self._expire)
        self.expiry.daemon = True
        self.expiry.start()

    def _expire(self):  # the head did not arrive in time: close, whatever the read in progress
        self.expired = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self):
        self.expiry.cancel()
        super().finish()

    def log_message(self, format, *args):  # quiet: errors are answered to the page, not printed per request
        pass

    def log_error(self, format, *args):  # http.server's own refusals (a malformed or timed-out request): one line
        self._log((format % args)[:200])

    def _log(self, message: str) -> None:
        print(f"hkd explore: {self.client_address[0]}: {' '.join(message.split())}", file=sys.stderr, flush=True)

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, route):
        self.expiry.cancel()
        url = urlparse(self.path)
        if self.expired:
            self._log(f"{self.command} {web.quote(url.path)}: refused: the head took over {HEAD_DEADLINE:g} s")
            self.close_connection = True
            return
        request = f"{self.command} {web.quote(url.path)}"
        try:
            refusal = self.address.refusal(self.headers, self.command, url.path, PAGE_PATHS)
            if refusal is not None:
                raise web.Refused(HTTPStatus.FORBIDDEN, refusal)
            query = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=32).items()}
            status, kind, body, headers = route(url.path, query)
        except web.Refused as error:
            if error.status in (HTTPStatus.FORBIDDEN, HTTPStatus.REQUEST_TIMEOUT):
                self._log(f"{request}: refused: {error}")
            status, kind, body, headers = error.status, "json", {"error": web.line(str(error))}, {}
        except (ValueError, KeyError, TypeError) as error:  # the message, cut: it may quote what was sent
            key = isinstance(error, KeyError) and error.args
            message = f"missing or unknown {web.quote(error.args[0])}" if key else (str(error) or type(error).__name__)
            status, kind, body, headers = HTTPStatus.BAD_REQUEST, "json", {"error": web.line(message)}, {}
        except ConnectionError as error:  # the client went away while sending: nobody to answer
            self._log(f"{request}: the client closed the connection ({error or type(error).__name__})")
            self.close_connection = True
            return
        except Exception as error:  # one line, never a traceback page
            self._log(web.line(f"{request}: {type(error).__name__}: {error}"))
            status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, "json"
            body, headers = {"error": web.line(f"internal error: {type(error).__name__}: {error}")}, {}
        if kind == "json":
            body, kind = json.dumps(body).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (ConnectionError, TimeoutError) as error:  # the client left (or stopped reading) before the answer
            self._log(f"{request}: the client closed the connection before the answer ({type(error).__name__})")
            self.close_connection = True

    def _state(self, query) -> tuple[int, list, Edit | None]:
        x = self.explorer
        edit = x.edits[query["edit"]] if query.get("edit") else None
        seed = web.integer(query.get("seed", "0"), "seed", 0, MAX_SEED)
        if edit is not None and edit.seed != seed:
            raise ValueError(f"edit {web.quote(query['edit'])} belongs to seed {edit.seed}, not {seed}")
        return seed, parse_off(query.get("off", ""), x.levels), edit

    def _get(self, path, query):
        x = self.explorer
        if path in PAGE_PATHS:
            return HTTPStatus.OK, "text/html; charset=utf-8", resources.files("hkd").joinpath(PAGE).read_bytes(), {}
        if path == "/api/info":
            return HTTPStatus.OK, "json", x.info(), {}
        scale = web.integer(query.get("scale", "1"), "scale", 1, 32)
        download = lambda name: {"Content-Disposition": f'attachment; filename="{name}"'} if "download" in query else {}
        if path == "/api/frame.png":
            seed, off, edit = self._state(query)
            image = x.frame(seed, web.number(query["t"], "t"), off, edit)
            return HTTPStatus.OK, "image/png", png_bytes(image, scale), download("hkd_frame.png")
        if path == "/api/teacher.png":
            seed = web.integer(query.get("seed", "0"), "seed", 0, MAX_SEED)
            image = x.teacher_frame(seed, web.number(query["t"], "t"), query.get("view", "denoised"))
            return HTTPStatus.OK, "image/png", png_bytes(image, scale), {}
        if path == "/api/trajectory.gif":
            seed, off, edit = self._state(query)
            return HTTPStatus.OK, "image/gif", x.trajectory_gif(seed, off, edit), download("hkd_trajectory.gif")
        return HTTPStatus.NOT_FOUND, "json", {"error": f"not found: {web.quote(path)}"}, {}

    def _post(self, path, query):
        x = self.explorer
        if path == "/api/upload":
            return HTTPStatus.OK, "json", {"upload": x.upload(web.read_body(self, MAX_UPLOAD_BYTES, BODY_DEADLINE))}, {}
        if path == "/api/edit":
            request = web.json_object(web.read_body(self, MAX_EDIT_BYTES, BODY_DEADLINE), "the edit", EDIT_FIELDS)
            edit = x.apply_edit(**edit_arguments(x, request))
            return HTTPStatus.OK, "json", {"edit": x.edit_id(edit), "t": edit.t}, {}
        return HTTPStatus.NOT_FOUND, "json", {"error": f"not found: {web.quote(path)}"}, {}


class Server(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once. One more is refused at once with a 503 (a
    one-line JSON error and Retry-After), not queued: a queued connection would wait unseen behind slow clients with
    no deadline of its own, while a refusal costs no thread and tells the page to retry."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = MAX_CONNECTIONS
        self.slots = threading.BoundedSemaphore(self.limit)
        self.refused_at = -math.inf  # when the last refusal was printed (one console line per 10 s at most)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            return self._busy(request, client_address)
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _busy(self, request, client_address):  # on the serving thread: a short answer, a short timeout
        body = json.dumps({"error": f"the server has {self.limit} connections open (its limit); retry"})
        head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        head += f"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        with contextlib.suppress(OSError):
            request.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                request.recv(65536)  # the request, if it is there: closing over unread bytes would reset the answer
            request.sendall((head + body).encode())
        self.shutdown_request(request)
        if time.monotonic() - self.refused_at > 10:
            self.refused_at = time.monotonic()
            print(f"hkd explore: {client_address[0]}: refused: {self.limit} connections open (the limit)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def handle_error(self, request, client_address):  # whatever escapes a handler: one line, not a traceback
        error = sys.exc_info()[1]
        text = str(error).splitlines()[0][:200] if str(error) else ""
        print(f"hkd explore: {client_address[0]}: {type(error).__name__}: {text}", file=sys.stderr, flush=True)


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free port); serve_forever() runs it. A port in use is a one-line error."""
    handler = type("ExploreHandler", (Handler,), {"explorer": explorer})
    try:
        server = Server((host, port), handler)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error} (try another --port)") from None
    handler.address = web.Address(host, *server.server_address[:2])
    return server


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, *, name: str = "") -> None:
    server = make_server(explorer, host, port)
    address, port = server.server_address[:2]
    print(f"hkd explore: {name} at http://{address}:{port}/ (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
