"""Command line: ``blockpredict predict | plan | submit | status | unlock | demo | bench``.

Bad input prints one line ``error: ...`` and exits with code 2 (a traceback
only with ``--debug``); a run with failed blocks exits with code 1.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import BlockpredictError
from .worker_exit import leave

# what `bench --only` may pick (device and cluster also need --device-ms / --simulate-workers)
BENCH_PARTS = ("compare", "startup", "dispatch", "device", "cluster")

logger = logging.getLogger("blockpredict")


def command() -> None:
    """The ``blockpredict`` command: :func:`main`, ending without the interpreter's teardown.

    With torch, Dask and zarr imported, the teardown (freeing every module) took
    1.2-1.4 s after a run's work was done. The process still does what exit does
    first: it waits for its non-daemon threads and runs the atexit handlers (the
    forkserver's kill, finalizers, logging's flush); the last of them flushes
    stdout and stderr and ends the process with :func:`main`'s exit code.
    """
    codes: list[int] = []  # what main returned; empty when it raised
    atexit.register(_exit_at_once, codes)  # registered first: runs after every other handler
    codes.append(main())
    sys.exit(codes[0])


def _exit_at_once(codes: list[int]) -> None:
    if codes:  # else main raised (SystemExit from --help, say): the usual way
        leave(codes[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(args.debug))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler])
    if not args.debug:  # a filter on our handler: Dask resets its loggers' levels on import
        handler.addFilter(_quiet_libraries)
    try:
        return int(args.func(args))
    except BlockpredictError as e:
        if args.debug:
            e.__suppress_context__ = False  # show the error it was raised from, in full
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:  # the whole chain of causes, e.g. of a TorchScript error
            raise
        print(f"error: {describe_exception(e)}: rerun with --debug for details", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


NOISY = (
    "distributed",
    "dask",
    "bokeh",
    "tornado",
    "botocore",
    "aiobotocore",
    "s3fs",
    "werkzeug",
    # imported on first use, after logging is set up: "NumExpr defaulting to ...", and
    # torch's "FakeTensor cache stats" at exit after a Ctrl-C stopped its import
    "numexpr",
    "torch._subclasses",
)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Libraries' records below ERROR stay out of the terminal (``--debug`` shows them)."""
    return record.levelno >= logging.ERROR or not record.name.startswith(NOISY)


class _Formatter(logging.Formatter):
    """``warning: ...`` and ``error: ...`` prefixes; levels and loggers with --debug."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.debug and record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text


def describe_exception(e: BaseException) -> str:
    """``Type: first line`` of an unexpected error (its chained causes only with --debug)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="blockpredict", description="Blockwise prediction of PyTorch models over zarr volumes."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"blockpredict {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="predict a whole volume")
    _workflow_args(predict)
    predict.add_argument("--report", type=Path, help="write a JSON run report here")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    predict.add_argument(
        "--progress-interval",
        type=float,
        metavar="SECONDS",
        help="without a terminal, print a progress line this often (default 60)",
    )
    predict.add_argument(
        "--dashboard-linger",
        type=float,
        metavar="SECONDS",
        help="keep the dashboard page up this long after the run (Ctrl-C closes it)",
    )
    predict.set_defaults(func=_predict)

    plan = sub.add_parser("plan", help="print the block plan without running anything")
    _workflow_args(plan)
    plan.set_defaults(func=_plan)

    submit = sub.add_parser("submit", help="check a workflow, then run predict as a batch job")
    _workflow_args(submit)
    submit.add_argument("--report", type=Path, help="where the job writes its JSON report")
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="print the progress of a workflow from its ledger")
    _workflow_args(status)
    status.set_defaults(func=_status)

    preview = sub.add_parser(
        "preview", help="write a PNG of one section: input, output and the block grid"
    )
    _workflow_args(preview)
    preview.add_argument("--z", type=float, help="world z of the section (default: the middle)")
    preview.add_argument("--out", type=Path, default=Path("preview.png"), help="the PNG to write")
    preview.set_defaults(func=_preview)

    unlock = sub.add_parser("unlock", help="remove the lock a dead or far-away run left")
    _workflow_args(unlock)
    unlock.set_defaults(func=_unlock)

    bench = sub.add_parser("bench", help="measure start-up, dispatch rate and throughput")
    bench.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    bench.add_argument("--dir", type=Path, help="keep the bench data here (default: a temp dir)")
    bench.add_argument("--json", type=Path, help="also write the figures as JSON")
    bench.add_argument(
        "--store",
        type=float,
        metavar="DELAY_MS",
        help="only the object-store figures: chunk cache on/off against a local S3 endpoint "
        "with this delay per request (needs moto[server], from the test extra)",
    )
    bench.add_argument("--repeat", type=int, help="runs per figure, medians (default 3, quick 1)")
    bench.add_argument(
        "--device-ms", type=float, help="also run a simulated device whose forward sleeps D ms"
    )
    bench.add_argument(
        "--simulate-workers",
        type=int,
        metavar="N",
        help="dispatch rate of N/4, N/2 and N simulated workers "
        "(separate processes of 8 workers each, no storage)",
    )
    bench.add_argument(
        "--simulate-ms",
        type=float,
        default=50.0,
        help="the simulated cluster's device time per block (default 50 ms)",
    )
    bench.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the side-by-side comparison runs (default auto: a GPU where one is visible)",
    )
    bench.add_argument(
        "--only",
        help="comma-separated parts to run: " + ", ".join(BENCH_PARTS) + " (default: all of them)",
    )
    bench.set_defaults(func=_bench)
    _debug_arg(bench)

    demo = sub.add_parser("demo", help="predict a synthetic volume with a small U-Net")
    demo.add_argument("--dir", type=Path, default=Path("blockpredict-demo"), help="work folder")
    demo.add_argument(
        "--dashboard-linger",
        type=float,
        metavar="SECONDS",
        help="keep the dashboard page up this long after the run (Ctrl-C closes it)",
    )
    demo.set_defaults(func=_demo)
    _debug_arg(demo)
    return parser


def _debug_arg(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too (it keeps the top-level value when absent)."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )


def _workflow_args(parser: argparse.ArgumentParser) -> None:
    _debug_arg(parser)
    parser.add_argument("workflow", type=Path, help="workflow YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a workflow key, e.g. --set cluster.n_workers=4",
    )


def _predict(args: argparse.Namespace) -> int:
    from .config import load_workflow

    overrides = list(args.overrides)
    if args.progress_interval is not None:
        overrides.append(f"execution.progress_interval={args.progress_interval}")
    if args.dashboard_linger is not None:
        overrides.append(f"execution.dashboard_linger={args.dashboard_linger}")
    workflow = load_workflow(args.workflow, overrides)
    if args.report:
        check_report_path(args.report)
    from .warm_start import begin_for

    begin_for(workflow.cluster)  # local workers' imports overlap the client's own
    from .workflow import predict_workflow  # torch, zarr and Dask: after the cheap checks

    report = predict_workflow(workflow, progress=not args.no_progress)
    print(report.summary(), file=sys.stderr)
    if args.report:
        try:
            report.write(args.report)
        except OSError as e:  # the run's outcome stands; only its report is lost
            logger.warning("the report could not be written to %s: %s", args.report, e.strerror)
    return report.exit_code


def check_report_path(path: Path) -> None:
    """A report that cannot be written fails before the run, not after it."""
    from .errors import ConfigError
    from .location import writable_problem

    if path.is_dir():
        problem: str | None = "it is a folder"
    elif path.exists():
        problem = None if os.access(path, os.W_OK) else "not writable"
    else:
        problem = writable_problem(str(path.resolve().parent))
    if problem:
        raise ConfigError(
            f"the report cannot be written: {problem}", str(path), "choose another --report path"
        )


def _plan(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .describe import describe_plan
    from .workflow import prepare_workflow

    workflow = load_workflow(args.workflow, args.overrides)
    prepared = prepare_workflow(workflow)
    print(describe_plan(prepared))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .submit import submit
    from .workflow import prepare_workflow

    workflow = load_workflow(args.workflow, args.overrides)
    prepare_workflow(workflow)  # bad input fails here, not in the queue
    submission = submit(args.workflow, workflow, args.overrides, args.report)
    print(f"job: {submission.job_id}")
    print(f"script: {submission.script}")
    print(f"logs: {submission.log_directory}")
    print(f"report: {submission.report}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .events import events_path, replay
    from .ledger import Ledger, ledger_path
    from .lock import OutputLock, lock_path
    from .storage import output_path

    workflow = load_workflow(args.workflow, args.overrides)
    output = output_path(workflow.output.container, workflow.output.dataset)
    path = ledger_path(output)
    options = workflow.output.storage_options
    holder = OutputLock(output, options).holder()
    if holder is not None:
        print(f"running: {holder} (lock {lock_path(output)})")
    if not Ledger.exists(path, options):
        from .workflow import count_blocks

        print(f"done: 0/{count_blocks(workflow)} (not started)")  # without loading the model
        return 0
    ledger = Ledger.open(path, storage_options=options)
    replay(ledger, events_path(output))  # the log is current while a run goes on
    counts = ledger.counts()
    total = sum(counts.values())
    print(f"ledger: {path}")
    print(f"done: {counts['done']}/{total} ({100 * counts['done'] / max(total, 1):.1f}%)")
    print(f"failed: {counts['failed']}")
    print(f"todo: {counts['todo']}")
    failed = ledger.failed_ids()
    if failed:
        shown = " ".join(str(i) for i in failed[:100])
        print(f"failed blocks: {shown}" + (" ..." if len(failed) > 100 else ""))
    return 0


def _preview(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .preview import write_preview
    from .storage import output_path

    workflow = load_workflow(args.workflow, args.overrides)
    source = output_path(workflow.input.container, workflow.input.dataset)
    out = output_path(workflow.output.container, workflow.output.dataset)
    groups = list(workflow.output.datasets or {})
    image = output_path(workflow.output.container, groups[0]) if groups else None
    layout = write_preview(source, out, args.out, args.z, image)
    where = f" at z = {layout.z}" if layout.z is not None else ""
    print(f"preview{where}: {args.out.resolve()} ({', '.join(layout.panels)})")
    return 0


def _unlock(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .errors import ConfigError
    from .lock import OutputLock
    from .storage import output_path

    workflow = load_workflow(args.workflow, args.overrides)
    out = workflow.output
    lock = OutputLock(output_path(out.container, out.dataset), out.storage_options)
    holder = lock.holder()
    if holder is None:
        print(f"not locked: {lock.path}")
        return 0
    if holder.on_this_host and holder.alive:
        raise ConfigError(
            f"the lock is held by a running process ({holder})",
            lock.path,
            f"stop that run first (kill -INT {holder.pid})",
        )
    lock.break_lock()
    print(f"unlocked: {lock.path} (was {holder})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    if args.store is not None:
        from .bench_store import bench_store, format_store

        results = bench_store(args.store)
        print(format_store(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    from .bench import format_results, run_bench
    from .errors import ConfigError

    parts = BENCH_PARTS if args.only is None else tuple(p.strip() for p in args.only.split(","))
    unknown = sorted(set(parts) - set(BENCH_PARTS))
    if unknown:
        raise ConfigError(
            f"bench --only: unknown part {', '.join(unknown)}",
            "--only",
            "choose from " + ", ".join(BENCH_PARTS),
        )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "bench --device cuda: no GPU is visible", "--device", "use auto or cpu"
            )
    results = run_bench(
        args.dir,
        args.quick,
        args.repeat,
        args.device_ms,
        args.simulate_workers,
        args.simulate_ms,
        parts,
        args.device,
    )
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, args.dashboard_linger)


if __name__ == "__main__":
    command()
