"""The printed figures of ``blockpredict bench`` (the JSON holds the same, unrounded)."""

from __future__ import annotations

from typing import Any


def format_results(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "compare" in results:
        lines += _compare(results)
    if "startup" in results:
        lines += _startup(results)
    if "dispatch" in results:
        lines += _dispatch(results)
    lines += _simulated(results)
    lines.append(f"bench took {results['bench_seconds']:.0f} s")
    return "\n".join(lines)


def _compare(results: dict[str, Any]) -> list[str]:
    c = results["compare"]
    width = max(12, *map(len, c["modes"]))
    lines = [
        f"side by side: {c['model']} on {c['input']} ({c['blocks']} blocks), {c['cores']} cores"
        + (f", {c['device']}" if c.get("device", "cpu") != "cpu" else "")
        + f", medians of {results['repeats']}:",
        f"  {'mode':<{width}} {'wall s':>8} {'M voxels/s':>11} {'of limit (wall)':>16} "
        f"{'of limit (steady)':>18}",
    ]
    for name, m in c["modes"].items():
        lines.append(
            f"  {name:<{width}} {m['wall_s']:>8.1f} {m['voxels_per_s'] / 1e6:>11.2f} "
            f"{m['of_limit_wall']:>16.2f} {m['of_limit_steady']:>18.2f}"
        )
    for r in c["limit_layouts"]:
        lines.append(
            f"  limit: {r['layout']:<30} {r['allocator']:<11} "
            f"{r['voxels_per_s'] / 1e6:.2f} M voxels/s"
        )
    for phase, p in c["engine_phases"].items():
        lines.append(
            f"  engine {phase:<8} total {p['total']:.1f} s  p50 {p['p50'] * 1000:.0f} ms  "
            f"p90 {p['p90'] * 1000:.0f} ms"
        )
    return lines


def _startup(results: dict[str, Any]) -> list[str]:
    lines = ["start-up (plan, and predict up to its first block id; medians):"]
    for r in results["startup"]:
        lines.append(
            f"  {r['input']:>16}  {r['blocks']:>9} blocks  plan {r['plan_s']:.2f} s  "
            f"start {r['start_s']:.2f} s  peak {r['peak_mb']:.0f} MB"
        )
    return lines


def _dispatch(results: dict[str, Any]) -> list[str]:
    lines = ["dispatch, trivial model, 2 worker processes (medians):"]
    for r in results["dispatch"]:
        lines.append(
            f"  blocks_per_task {r['blocks_per_task']!s:>4}  {r['blocks']} blocks  "
            f"{r['blocks_per_s']:.0f} blocks/s ({r['steady_blocks_per_s']:.0f} steady)"
        )
    return lines


def _simulated(results: dict[str, Any]) -> list[str]:
    lines = []
    if "device" in results:
        d = results["device"]
        lines.append(
            f"simulated device {d['device_ms']:g} ms, {d['workers']} workers, {d['blocks']} "
            f"blocks of {d['block']}: busy {d['busy']:.2f} of the time, "
            f"{d['busy_steady']:.2f} once the model is loaded (wall {d['wall_s']:.1f} s)"
        )
    for r in results.get("simulated_cluster", []):
        lines.append(
            f"simulated cluster: {r['workers']:>4} workers  {r['blocks']} blocks  "
            f"{r['blocks_per_s']:.0f} blocks/s of {r['ideal']:.0f} ideal ({r['of_ideal']:.2f}); "
            f"{r['steady_blocks_per_s']:.0f} blocks/s over the middle 80% of the blocks"
        )
        lines.append(
            f"  scheduler and client: {r['scheduler_cpu_ms_per_block']:.2f} ms of CPU per block, "
            f"a whole core at {r['scheduler_limit_blocks_per_s']:.0f} blocks/s"
        )
    return lines
