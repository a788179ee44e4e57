"""Our page in the Dask dashboard: ``/blockpredict``, linked from its navigation bar.

It shows the live state of the run (:mod:`blockpredict.live`): a block map (one
layer of the output's block grid, or the worst state over all layers), output
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
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from .live import STATE_COLORS, STATE_NAMES, LiveState, lookup
from .words import plural

logger = logging.getLogger(__name__)

PAGE = "blockpredict"
REFRESH_MS = 1000


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
        AdaptiveTicker,
        CheckboxGroup,
        ColumnDataSource,
        DataTable,
        Div,
        LinearColorMapper,
        Range1d,
        Slider,
        TableColumn,
    )
    from bokeh.plotting import figure

    doc.title = "Dask: blockpredict"
    header = Div(text="<h2>blockpredict</h2><p>no blockpredict run in this process yet</p>")
    legend = Div(text=_legend())
    image = ColumnDataSource({"image": [_empty()], "dw": [1], "dh": [1]})
    block_map = figure(
        title="block map",
        width=520,
        height=520,
        x_range=Range1d(0, 1),
        y_range=Range1d(1, 0),
        tools="pan,wheel_zoom,reset",
        toolbar_location="above",
        name="block_map",
        css_classes=["blockpredict-block-map"],
    )
    mapper = LinearColorMapper(palette=list(STATE_COLORS), low=-0.5, high=len(STATE_COLORS) - 0.5)
    block_map.image(image="image", x=0, y=0, dw="dw", dh="dh", source=image, color_mapper=mapper)
    block_map.xaxis.axis_label, block_map.yaxis.axis_label = "block x", "block y"
    for axis in (block_map.xaxis, block_map.yaxis):
        axis.ticker = AdaptiveTicker(min_interval=1, num_minor_ticks=0)
    layer = Slider(start=0, end=1, value=0, step=1, title="block layer z", width=500)
    projection = CheckboxGroup(labels=["worst state over all z layers"], active=[])
    rates = ColumnDataSource({"time": [], "blocks": [], "voxels": []})
    voxels = figure(title="output voxels/s", x_axis_type="datetime", width=520, height=230)
    voxels.line("time", "voxels", source=rates, line_width=2)
    blocks = figure(title="blocks/s", x_axis_type="datetime", width=520, height=230)
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

    def update() -> None:
        live = state()
        if live is None or live.plan is None:
            return
        grid = tuple(live.plan.grid_shape)
        layers = max(1, live.states.size // max(1, _plane(grid))) if live.states is not None else 1
        layer.end = max(1, layers - 1)
        layer.visible = projection.visible = layers > 1
        z = None if (0 in projection.active or layers == 1) else int(layer.value)
        codes = live.block_map(z)
        ny, nx = codes.shape
        image.data = {"image": [codes], "dw": [nx], "dh": [ny]}
        block_map.x_range.end, block_map.y_range.start = nx, ny
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
        shown = list(live.failures)
        failures.data = {
            "block": [f["block"] for f in shown],
            "index": [str(tuple(f["index"])) for f in shown],
            "worker": [f["worker"] for f in shown],
            "error": [f["error"] for f in shown],
        }
        failed_title.text = f"<h3>failed blocks ({live.failed})</h3>"

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


def _plane(grid: tuple[int, ...]) -> int:
    ny, nx = ((1, 1) + grid)[-2:]
    return ny * nx


def _empty() -> Any:
    import numpy as np

    return np.zeros((1, 1), np.uint8)


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
        f"<p>done {c['done']}/{c['total']} ({c['processed']} processed, {c['skipped']} skipped"
        f" by resume), {c['failed']} failed, {plural(c['retries'], 'retry', 'retries')}, "
        f"{c['in_flight']} in flight,"
        f" {plural(c['workers'], 'worker')}</p>",
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
