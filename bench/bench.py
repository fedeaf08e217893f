"""The fastpoetry benchmark: fastpoetry against Twisted, nginx and naive trio, in one run.

Run it with ``bench/run``, which installs what it needs, builds the load
generator and calls this script with the benchmark's own venv::

    bench/run [--smoke] [--out DIR] [--only NAME,...] [--check] [--baseline REV]

Every server is started pinned to the server core and checked to serve
the exact poem; then, at each concurrency, they take turns in rounds under
load from ``loadgen`` pinned to the other core, the order rotated every
round (see sections.py); then come the 1 MiB poem (in rounds too), the
3 KB poem over TLS (fastpoetry and nginx's stream ssl, a full handshake
every poem, in rounds of their own), cold starts under socket activation,
fastpoetry's logging cost and, if it has them, its workers.
Progress goes to standard error, one line per measured cell; the tables
go to standard output and, with the JSON and a plot, to the output
directory.  The exit status is 0 whatever the figures, unless ``--check``
is given and a target is missed; 2 if the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import machine
import plot
import procfs
import report
import servers
import source
import syscalls
from measure import Cores
from plan import FULL, SMOKE, describe_load
from poem_files import write_big_poem
from results import Baseline, Run
from sections import Sections, progress
from servers import BASELINE, CONTENDERS, TLS, TLS_CONTENDERS, Contender, Paths

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _parse_args(argv: list[str]) -> argparse.Namespace:
    keys = [c.key for c in CONTENDERS] + [TLS]
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks that everything runs (figures mean nothing)")
    parser.add_argument("--out", type=Path, default=BENCH / "out", help="where results go (default: bench/out)")
    parser.add_argument("--only", help=f"servers to run, comma-separated, of: {','.join(keys)},{BASELINE} "
                        f"({TLS}: the section over TLS, fastpoetry and nginx; {BASELINE} with --baseline; "
                        "default: all)")  # fmt: skip
    parser.add_argument("--baseline", metavar="REV", help="one more row: fastpoetry from git commit REV, "
                        "measured in the same rounds as the work tree's")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--loadgen", type=Path, required=True, help="the built load generator (bench/run builds it)")
    parser.add_argument("--server-core", default="0", help="the core the servers run on (default 0)")
    parser.add_argument("--loadgen-core", default="1", help="the core the load generator runs on (default 1)")
    args = parser.parse_args(argv)
    if args.baseline is not None:
        keys.append(BASELINE)
    only = keys if args.only is None else [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = sorted(set(only) - set(keys))
    if BASELINE in unknown:
        parser.error(f"--only {BASELINE} needs --baseline REV")
    if unknown or not only:
        parser.error(f"--only takes some of {','.join(keys)}, not {','.join(unknown) or 'nothing'}")
    args.only = only
    return args


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the run as Ctrl-C does, so every server is stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Also Ctrl-C itself: a shell starts a background job with SIGINT
    # ignored, and Python keeps it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def _write_outputs(run: Run, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(run.to_json(), indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(report.markdown(run), encoding="utf-8")
    (out / "results.txt").write_text(report.text(run), encoding="utf-8")
    plot.write(run, out / "results.png")


def _resolve_baseline(rev: str | None) -> source.Revision | None:
    """--baseline's commit, or None without it; BadRevision before any output is touched."""
    if rev is None:
        return None
    revision = source.resolve(REPO, rev)
    label = _baseline_label(revision)
    if label in {c.label for c in CONTENDERS}:
        raise source.BadRevision(f"--baseline {rev}: its row would be called {label!r}, as another row is")
    return revision


def _baseline_label(revision: source.Revision) -> str:
    # The REV as given, which is what the person running it will look for
    # in the table; the commit it named goes into the versions and the JSON.
    return f"fastpoetry ({revision.given})"


def _take_baseline(revision: source.Revision, paths: Paths, run: Run, work_tree_hash: str) -> Contender:
    """Snapshot src/fastpoetry at ``revision`` into the run's directory, record it in ``run``; its row."""
    src = paths.run / "baseline-src"
    src.mkdir(parents=True, exist_ok=True)
    source_hash = source.snapshot_revision(REPO, revision, src)
    label = _baseline_label(revision)
    same = source_hash == work_tree_hash
    run.baseline = Baseline(revision.given, revision.commit, label, source_hash, same_source=same)
    version = machine.fastpoetry_version(src)
    run.versions[label] = f"{version} (commit {revision.short}; source {source_hash})"
    return servers.baseline(label, src)


def _contenders(only: list[str], baseline: Contender | None) -> list[Contender]:
    """The rows to measure, the baseline right after fastpoetry so the two sit together in the tables."""
    chosen = []
    for contender in CONTENDERS:
        if contender.key in only:
            chosen.append(contender)
        if contender.key == "fastpoetry" and baseline is not None and BASELINE in only:
            chosen.append(baseline)
    return chosen


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    _stop_on_signals()
    began = time.monotonic()
    try:
        revision = _resolve_baseline(args.baseline)
    except source.BadRevision as exc:
        progress(f"ERROR: {exc}")  # before the last run's logs are emptied
        return 2
    out: Path = args.out.resolve()
    paths = Paths(
        repo=REPO, bench=BENCH, venv=BENCH / ".venv", logs=out / "logs", run=out / "run",
        fastpoetry_src=out / "run" / "src",
    )  # fmt: skip
    for directory in (paths.logs, paths.run):  # this run's, not an earlier run's
        shutil.rmtree(directory, ignore_errors=True)
    for directory in (out, paths.logs, paths.run, paths.fastpoetry_src):
        directory.mkdir(parents=True, exist_ok=True)
    source_hash = source.snapshot(REPO / "src" / "fastpoetry", paths.fastpoetry_src)
    plan = SMOKE if args.smoke else FULL
    cores = Cores(server=args.server_core, loadgen=args.loadgen_core)
    unusable = sorted({*cores.server_list(), *cores.loadgen_list()} - set(procfs.online_cores()))
    if unusable:
        progress(f"cannot pin to core {','.join(map(str, unusable))}: this process may use cores "
                 f"{','.join(map(str, procfs.online_cores()))} (see --server-core, --loadgen-core)")  # fmt: skip
        return 2
    run = Run(
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        command=shlex.join(["bench/run", *argv_for_display(argv)]),
        smoke=args.smoke,
        machine=machine.describe(),
        versions=machine.versions(paths, source_hash),
        settings={
            "server_core": cores.server,
            "loadgen_core": cores.loadgen,
            "concurrencies": list(plan.concurrencies),
            "target_load": describe_load(plan.target),
            "other_load": describe_load(plan.other),
            "big_load": f"{plan.big_concurrency} clients, {describe_load(plan.big)}",
            "cold_start_repeats": plan.cold_repeats,
            "logging_load": describe_load(plan.logging),
            "min_rounds": plan.min_rounds,
            "quiet_pct": plan.quiet_pct,
            "retries": plan.retries,
            "workers_load": describe_load(plan.workers),
            "syscall_count_load": describe_load(plan.count),
            "syscall_breakdown_load": describe_load(plan.breakdown),
            "backlog": servers.BACKLOG,
            "tls_target_load": describe_load(plan.tls_target),
            "tls_other_load": describe_load(plan.tls_other),
            "tls_certificate": servers.TLS_CERTIFICATE,
        },
        perf_unavailable=syscalls.probe((syscalls.ALL, *syscalls.BREAKDOWN)),
    )
    if run.perf_unavailable:
        progress(f"system calls will not be counted: {run.perf_unavailable}")
    baseline_row = _take_baseline(revision, paths, run, source_hash) if revision else None
    bench = Sections(paths, plan, cores, args.loadgen.resolve(), run)
    progress(f"results go to {out}; servers on core {cores.server}, load generator on core {cores.loadgen}")
    contenders = _contenders(args.only, baseline_row)
    try:
        bench.small_poem(contenders)
        big = out / "run" / "big-poem.txt"
        write_big_poem(big)
        serving = [c for c in contenders if run.servers.get(c.label) == "ok"]
        if serving:
            bench.big_poem(serving, big)
        if TLS in args.only:
            bench.tls(list(TLS_CONTENDERS))
        bench.cold_starts(args.only)
        if "fastpoetry" in args.only:
            bench.logging_cost()
            bench.workers()
    except KeyboardInterrupt:
        progress("interrupted: every server was stopped; no results written")
        return 130
    run.targets = report.targets(run)
    report.judge_baseline(run)
    run.seconds = time.monotonic() - began
    _write_outputs(run, out)
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    print(report.text(run), end="")
    progress(f"wrote {out / 'results.txt'}, results.md, results.json and results.png")
    missed = [t for t in run.targets if t.passed is not True]
    return 1 if args.check and missed else 0


def argv_for_display(argv: list[str]) -> list[str]:
    """The command line as a person would type it: without the --loadgen bench/run adds."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--loadgen":
            skip = True
            continue
        if not arg.startswith("--loadgen="):
            shown.append(arg)
    return shown


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
