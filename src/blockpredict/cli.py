"""Command line: ``blockpredict predict | plan | submit | status | demo | bench``.

Bad input prints one line ``error: ...`` and exits with code 2 (a traceback
only with ``--debug``); a run with failed blocks exits with code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import BlockpredictError

logger = logging.getLogger("blockpredict")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        for noisy in ("distributed", "bokeh", "tornado"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except BlockpredictError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockpredict", description="Blockwise prediction of PyTorch models over zarr volumes."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="predict a whole volume")
    _workflow_args(predict)
    predict.add_argument("--report", type=Path, help="write a JSON run report here")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")
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

    bench = sub.add_parser("bench", help="measure start-up, dispatch rate and throughput")
    bench.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    bench.add_argument("--dir", type=Path, help="keep the bench data here (default: a temp dir)")
    bench.add_argument("--json", type=Path, help="also write the figures as JSON")
    bench.add_argument("--repeat", type=int, help="runs per figure, medians (default 3, quick 1)")
    bench.add_argument(
        "--device-ms", type=float, help="also run a simulated device whose forward sleeps D ms"
    )
    bench.add_argument(
        "--simulate-workers", type=int, help="dispatch rate of N in-process simulated workers"
    )
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="predict a synthetic volume with a small U-Net")
    demo.add_argument("--dir", type=Path, default=Path("blockpredict-demo"), help="work folder")
    demo.set_defaults(func=_demo)
    return parser


def _workflow_args(parser: argparse.ArgumentParser) -> None:
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
    from .workflow import predict_workflow

    workflow = load_workflow(args.workflow, args.overrides)
    report = predict_workflow(workflow, progress=not args.no_progress)
    if args.report:
        report.write(args.report)
    print(report.summary(), file=sys.stderr)
    return report.exit_code


def _plan(args: argparse.Namespace) -> int:
    from .config import load_workflow
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
    from .errors import InputError
    from .ledger import Ledger, ledger_path
    from .storage import output_path

    workflow = load_workflow(args.workflow, args.overrides)
    path = ledger_path(output_path(workflow.output.container, workflow.output.dataset))
    if not Ledger.exists(path):
        raise InputError(
            "no ledger: this workflow has not started", path, "run blockpredict predict"
        )
    ledger = Ledger.open(path)
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


def describe_plan(prepared) -> str:  # type: ignore[no-untyped-def]
    """The plan as a user reads it: voxels and world units side by side."""
    plan = prepared.plan
    out = prepared.output

    def c(x) -> str:  # type: ignore[no-untyped-def]
        return "(" + ", ".join(str(v) for v in x) + ")"

    nbytes = prepared.output_nbytes()
    rows = [
        ("input", f"{prepared.input.path} {prepared.input.dtype} ROI {prepared.input.roi}"),
        ("input voxel size", c(plan.input_voxel_size)),
        ("output voxel size", c(plan.output_voxel_size)),
        (
            "context",
            f"{c(plan.context)} world, {c(plan.context / plan.input_voxel_size)} input voxels",
        ),
        ("read shape", f"{c(plan.read_shape)} voxels = {c(plan.read_size)} world"),
        ("write shape", f"{c(plan.write_shape)} voxels = {c(plan.write_size)} world"),
        ("border", plan.border),
        (
            "output ROI",
            f"offset {c(plan.output_roi.offset)} shape {c(plan.output_roi.shape)} world",
        ),
        ("block grid", f"{c(plan.grid_shape)} = {plan.num_blocks} blocks"),
        ("output", f"{out.container}/{out.dataset}"),
        (
            "output array",
            f"shape {c((prepared.num_out_channels, *plan.output_shape))} "
            f"chunks {c((prepared.num_out_channels, *plan.write_shape))} {out.dtype}",
        ),
        ("output size", f"{nbytes} bytes ({nbytes / 2**30:.3f} GiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    import json

    from .bench import format_results, run_bench

    results = run_bench(
        args.dir, args.quick, args.repeat, args.device_ms, args.simulate_workers
    )
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir)


if __name__ == "__main__":
    sys.exit(main())
