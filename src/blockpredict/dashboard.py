"""Our page in the Dask dashboard: ``/blockpredict``, linked from its navigation bar.

It shows the live state of the run (:mod:`blockpredict.live`): a block map (one
layer of the output's block grid, or the most telling state over all layers, at most
512 x 512 cells: see :mod:`blockpredict.blockmap`), output
voxels/s and blocks/s over time, the mean read / compute (forward) / write time
per block, and the failed blocks with their errors. It reads state; it never
drives the run.

Dask has no public API for adding a page to its dashboard (distributed #2790,
#3503), so :func:`install` uses two internals of ``distributed.dashboard.scheduler``
before a scheduler builds its Bokeh server: the ``applications`` dict (path ->
document function) and the memoized ``template_variables(scheduler)["pages"]``
(the navigation bar). blockpredict starts the scheduler of local and batch
clusters in its own process, so both take effect there. Tested with
distributed 2026.8.0 in Chromium (tests/test_dashboard.py); pyproject.toml caps
distributed below the next release. With ``type: address`` the
scheduler is someone else's: :func:`serve` serves the same page from the
blockpredict process on a port of its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import numpy as np

from .live import STATE_COLORS, STATE_NAMES, LiveState, lookup
from .words import plural

logger = logging.getLogger(__name__)

PAGE = "blockpredict"
REFRESH_MS = 1000
MAP_SIDE = 420  # pixels of the block map's longer side
RATE_FORMAT = "0.[00]a"  # numbro: 1068680 -> 1.07m, 250000 -> 250k, 0.5 -> 0.5
CLOCK = {"milliseconds": "%H:%M:%S.%3N", "seconds": "%H:%M:%S", "minsec": "%H:%M:%S"}

# the pages open in a browser now: document id -> (document, its refresh)
_PAGES: dict[int, tuple[Any, Callable[[], None]]] = {}


def install() -> bool:
    """Add our page to every scheduler dashboard this process starts from now on.

    Idempotent; False where the dashboard cannot run (bokeh missing or too old).
    """
    try:
        import distributed.dashboard.scheduler as dashboard
    except ImportError as e:
        logger.warning("no dashboard page: %s", e)
        return False
    dashboard.applications.setdefault("/" + PAGE, scheduler_page)
    original = dashboard.template_variables
    if getattr(original, "_blockpredict", False):
        return True

    def template_variables(scheduler: Any) -> dict[str, Any]:
        variables = original(scheduler)  # memoized: the same dict for every page
        if PAGE not in variables["pages"]:
            variables["pages"].append(PAGE)
        return variables

    template_variables._blockpredict = True  # type: ignore[attr-defined]
    dashboard.template_variables = template_variables
    return True


def scheduler_page(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """The document function the scheduler's Bokeh server calls for each visitor."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    build_document(doc, lambda: lookup(scheduler.address))
    doc.template = env.get_template("simple.html")
    doc.template_variables.update({**extra, "active_page": PAGE})
    doc.theme = BOKEH_THEME


def build_document(doc: Any, state: Callable[[], LiveState | None]) -> None:
    """Figures and their periodic update, reading ``state()`` at each refresh."""
    from bokeh.layouts import column, row
    from bokeh.models import (
        BasicTicker,
        CheckboxGroup,
        ColumnDataSource,
        CustomJSHover,
        DataRange1d,
        DataTable,
        DatetimeTickFormatter,
        Div,
        HoverTool,
        LinearColorMapper,
        NumeralTickFormatter,
        Range1d,
        Slider,
        TableColumn,
    )
    from bokeh.plotting import figure

    doc.title = "Dask: blockpredict"
    header = Div(text="<h2>blockpredict</h2><p>no blockpredict run in this process yet</p>")
    legend = Div(text=_legend())
    image = ColumnDataSource({"image": [np.zeros((1, 1), np.uint8)], "dw": [1], "dh": [1]})
    block_map = figure(
        title="block map",
        width=520,
        height=520,
        x_range=Range1d(-0.5, 0.5),
        y_range=Range1d(0.5, -0.5),
        tools="pan,wheel_zoom,reset",
        toolbar_location="above",
        name="block_map",
        css_classes=["blockpredict-block-map"],
    )
    mapper = LinearColorMapper(palette=list(STATE_COLORS), low=-0.5, high=len(STATE_COLORS) - 0.5)
    cells = block_map.image(
        image="image", x=-0.5, y=-0.5, dw="dw", dh="dh", source=image, color_mapper=mapper
    )
    state_name = CustomJSHover(code=f"return {list(STATE_NAMES)!r}[value] ?? ''")
    block_map.add_tools(
        HoverTool(
            renderers=[cells],
            tooltips=[("block (x, y)", "($x{0}, $y{0})"), ("state", "@image{state}")],
            formatters={"@image": state_name},
        )
    )
    block_map.xaxis.axis_label = "block x (index in the block grid)"
    block_map.yaxis.axis_label = "block y (index in the block grid)"
    for axis in (block_map.xaxis, block_map.yaxis):
        axis.ticker = BasicTicker(min_interval=1, num_minor_ticks=0)
        axis.formatter = NumeralTickFormatter(format="0")
    layer = Slider(start=0, end=1, value=0, step=1, title="block layer z", width=500)
    projection = CheckboxGroup(
        labels=["all z layers (the most telling state: failed, in flight, pending, done)"],
        active=[],
    )
    rates = ColumnDataSource({"time": [], "blocks": [], "voxels": []})
    voxels, blocks = (
        figure(title=t, x_axis_type="datetime", y_range=DataRange1d(start=0), width=520, height=230)
        for t in ("output voxels/s", "blocks/s")
    )  # from 0, so a steady rate reads as steady; 1.07m, 250k, 0.5, never 1.06868e+6
    for rate in (voxels, blocks):
        rate.yaxis.formatter = NumeralTickFormatter(format=RATE_FORMAT)
        # clock times: a short run's ticks read 09:41:48.500, not "500ms" over a date
        rate.xaxis.formatter = DatetimeTickFormatter(**CLOCK, context=None)
    voxels.line("time", "voxels", source=rates, line_width=2)
    blocks.line("time", "blocks", source=rates, line_width=2, color="#ff7f0e")
    phases = ColumnDataSource({"phase": ["read", "compute (forward)", "write"], "seconds": [0] * 3})
    phase_plot = figure(
        title="mean seconds per block", x_range=list(phases.data["phase"]), width=520, height=230
    )
    phase_plot.vbar(x="phase", top="seconds", width=0.6, source=phases)
    failures = ColumnDataSource({"block": [], "index": [], "worker": [], "error": []})
    table = DataTable(
        source=failures,
        width=1060,
        height=200,
        columns=[
            TableColumn(field="block", title="block", width=70),
            TableColumn(field="index", title="index", width=100),
            TableColumn(field="worker", title="worker", width=220),
            TableColumn(field="error", title="error", width=670),
        ],
    )
    failed_title = Div(text="<h3>failed blocks</h3>")

    shown: dict[str, Any] = {}

    def update() -> None:
        live = state()
        if live is None or live.plan is None:
            return
        cells = live.map
        layer.end = max(1, cells.layers - 1)
        layer.visible = projection.visible = cells.layers > 1
        z = None if (0 in projection.active or cells.layers == 1) else int(layer.value)
        layer.disabled = z is None  # the slider does nothing while all layers are shown
        codes = live.block_map(z)
        if shown.get("codes") is None or not np.array_equal(shown["codes"], codes):
            shown["codes"] = codes  # the browser gets the image only when it changed
            h, w = codes.shape
            image.data = {"image": [codes], "dw": [w * cells.step], "dh": [h * cells.step]}
        # block indices at the centres of the blocks: integer ticks, no 0.5
        block_map.x_range.end, block_map.y_range.start = cells.nx - 0.5, cells.ny - 0.5
        if shown.get("grid") != (cells.ny, cells.nx):  # square blocks: the grid's aspect
            shown["grid"] = (cells.ny, cells.nx)
            longest = max(cells.ny, cells.nx)
            block_map.frame_width = max(80, round(MAP_SIDE * cells.nx / longest))
            block_map.frame_height = max(80, round(MAP_SIDE * cells.ny / longest))
        block_map.title.text = _map_title(cells.step, cells.layers, z)
        header.text = _header(live)
        samples = list(live.throughput)
        rates.data = {
            "time": [datetime.fromtimestamp(t) for t, _, _ in samples],
            "blocks": [b for _, b, _ in samples],
            "voxels": [v for _, _, v in samples],
        }
        n = max(1, live.processed)
        phases.data = {
            "phase": list(phases.data["phase"]),
            "seconds": [live.phase_totals[p] / n for p in ("read", "compute", "write")],
        }
        failed = list(live.failures)
        failures.data = {
            "block": [f["block"] for f in failed],
            "index": [str(tuple(f["index"])) for f in failed],
            "worker": [f["worker"] for f in failed],
            "error": [f["error"] for f in failed],
        }
        failed_title.text = f"<h3>failed blocks ({live.failed})</h3>"

    _PAGES[id(doc)] = (doc, update)
    doc.on_session_destroyed(lambda context: _PAGES.pop(id(doc), None))
    doc.add_root(
        column(
            header,
            row(column(legend, block_map, layer, projection), column(voxels, blocks, phase_plot)),
            failed_title,
            table,
            name="blockpredict",
        )
    )
    update()
    doc.add_periodic_callback(update, REFRESH_MS)


def show_final(timeout: float = 3.0) -> None:
    """Have every open page draw the run's final state now, before its server closes.

    A page whose server is gone keeps what it last drew, so an open tab shows how the run
    ended. Returns at once when no page is open.
    """
    drawn = []
    for key, (doc, update) in list(_PAGES.items()):
        if not _connected(doc):  # no browser on it now, or its server is gone
            _PAGES.pop(key, None)
            continue
        event = threading.Event()

        def draw(update: Callable[[], None] = update, event: threading.Event = event) -> None:
            try:
                update()
            finally:
                event.set()

        try:
            doc.add_next_tick_callback(draw)  # Bokeh's way in from another thread
        except Exception as e:  # a session closing at this moment
            logger.debug("page not refreshed: %s", e)
            _PAGES.pop(key, None)
            continue
        drawn.append((key, event))
    deadline = time.monotonic() + timeout
    for key, event in drawn:
        if not event.wait(max(0.0, deadline - time.monotonic())):
            _PAGES.pop(key, None)  # its loop is not running: forget it
    if drawn:
        time.sleep(0.2)  # the last patch leaves the server's loop


def _connected(doc: Any) -> bool:
    """Whether a browser is connected to this document's session now."""
    session = getattr(getattr(doc, "session_context", None), "session", None)
    return session is not None and not session.destroyed and session.connection_count > 0


def linger(seconds: float, client: Any) -> None:
    """Keep the page up ``seconds`` after the run, or until Ctrl-C (SIGINT) or SIGTERM.

    The workers are let go first (``scale(0)`` where blockpredict started the cluster), so
    batch jobs and GPUs are not held; the scheduler and its dashboard stay.
    """
    cluster = getattr(client, "cluster", None)
    if cluster is not None and hasattr(cluster, "scale"):
        try:
            cluster.scale(0)
        except Exception as e:  # the page matters more than the workers' early exit
            logger.debug("workers not scaled down: %s", e)
    done = threading.Event()
    try:
        previous = {s: signal.signal(s, lambda *_: done.set()) for s in _ENDS}
    except ValueError:  # not the main thread: the time only
        previous = {}
    try:
        done.wait(seconds)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_ENDS = (signal.SIGINT, signal.SIGTERM)


def _map_title(step: int, layers: int, z: int | None) -> str:
    """What one pixel of the block map is."""
    what = f"block layer z = {z}" if z is not None else "all z layers"
    if layers == 1:
        what = "block states"
    cell = f", a cell = {step}x{step} blocks" if step > 1 else ""
    return f"block map: {what}{cell}"


def _legend() -> str:
    items = "".join(
        f'<span style="display:inline-block;margin-right:12px">'
        f'<span style="display:inline-block;width:12px;height:12px;background:{color};'
        f'margin-right:4px"></span>{name}</span>'
        for name, color in zip(STATE_NAMES, STATE_COLORS, strict=True)
    )
    return f"<div>{items}</div>"


def _header(live: LiveState) -> str:
    c = live.counts()
    status = "ended" if c["ended"] else "running"
    lines = [
        f"<h2>blockpredict: {status}</h2>",
        f"<p>output: {live.output_path} &nbsp; block grid {tuple(live.plan.grid_shape)}</p>",
        f"<p>done {c['done']:,}/{c['total']:,} ({c['processed']:,} processed, {c['skipped']:,}"
        f" skipped by resume), {c['failed']:,} failed,"
        f" {c['retries']:,} {'retry' if c['retries'] == 1 else 'retries'},"
        f" {c['in_flight']:,} in flight, {plural(c['workers'], 'worker')}</p>",
    ]
    if live.ended and live.summary:
        lines.append(f"<pre>{live.summary}</pre>")
    return "".join(lines)


@contextmanager
def page_url(client: Any, own_scheduler: bool) -> Iterator[str | None]:
    """The URL of our page for this run: on the scheduler's dashboard where blockpredict
    started the scheduler, else served by this process while the run lasts."""
    if own_scheduler:
        link = client.dashboard_link or ""
        yield link.rsplit("/", 1)[0] + "/" + PAGE if link.startswith("http") else None
        return
    address = client.scheduler.address
    try:
        url, stop = serve(lambda: lookup(address))
    except ImportError as e:
        logger.warning("no dashboard page: %s", e)
        yield None
        return
    try:
        yield url
    finally:
        stop()


def serve(
    state: Callable[[], LiveState | None], host: str = "127.0.0.1"
) -> tuple[str, Callable[[], None]]:
    """Serve the page from this process on a free port of ``host``; returns its URL and a stop.

    For ``type: address`` clusters, whose scheduler (and dashboard) is not ours.
    """
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    started = threading.Event()
    holder: dict[str, Any] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = Application(FunctionHandler(lambda doc: build_document(doc, state)))
        server = Server(
            {"/" + PAGE: app},
            port=port,
            address=host,
            io_loop=None,
            allow_websocket_origin=[f"{host}:{port}", f"localhost:{port}"],
        )
        server.start()
        holder["server"], holder["loop"] = server, loop
        started.set()
        loop.run_forever()
        server.stop()
        loop.close()

    thread = threading.Thread(target=main, name="blockpredict-dashboard", daemon=True)
    thread.start()
    started.wait(30)

    def stop() -> None:
        loop = holder.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return f"http://{host}:{port}/{PAGE}", stop
