"""`tensorscale batch JOBS.yaml`: run a file of conversions in parallel, resumably, with one summary.

The jobs file is validated whole before anything runs, so a mistake costs one line and writes nothing.
Ray is imported only with --executor ray. Exit status: 0 when every job is done or skipped, 1 when any
job failed (the summary says why), 2 for a mistake in the jobs file or the options.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from ..errors import TensorscaleError


@click.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False))
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: worker processes on this machine; ray: one Ray task per output shard.",
)
@click.option(
    "--address",
    default=None,
    metavar="RAY_ADDRESS",
    help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local Ray instance.",
)
@click.option(
    "--jobs",
    "-j",
    "jobs",
    type=int,
    default=None,
    help="local: worker processes (default: CPU count); ray: jobs in flight at once (default: CPU count).",
)
@click.option(
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help="local: memory all workers may use, e.g. 4GiB; ~0.5 GiB per worker (default: 80% of free memory).",
)
@click.option("--retries", type=int, default=2, show_default=True, help="Times a failed shard is tried again.")
@click.option(
    "--summary",
    "summary_path",
    default=None,
    metavar="FILE",
    help="Where to write the JSON summary (default: JOBS.summary.json beside the jobs file).",
)
@click.option(
    "--verify-files",
    is_flag=True,
    help="Every job as with `verify_files: true`: re-read each tensor written, and re-hash a finished "
    "job's files before skipping it (by default sizes and mtimes are compared with its manifest).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def batch(jobs_file, executor, address, jobs, memory_budget, retries, summary_path, verify_files, quiet, as_json):
    """Run a jobs file of conversions in parallel; rerun it to resume.

    \b
    JOBS.yaml:
      jobs:
        - {command: up, input: models/pythia-70m, output: out/pythia-70m-x2, embed_dim_multiplier: 2}
        - {command: up, input: EleutherAI/pythia-160m, output: out/pythia-160m-x2, embed_dim_multiplier: 2,
           up_proj_multiplier: 2, snr_db: 20, seed: 1}
        - {command: down, input: models/pythia-410m, output: out/pythia-410m-half, embed_dim_divisor: 2}

    Every input and output folder is checked before any job runs, then the outputs' parent folders are
    created. Jobs whose output exists and matches its manifest (by sizes and mtimes; --verify-files
    re-hashes) are skipped; failed jobs do not stop the others.
    """
    from ..batch.jobs import check_inputs_and_outputs, check_outputs, create_output_parents, load_jobs
    from ..batch.local_executor import default_memory_budget, worker_count
    from ..batch.overview import Overview
    from ..batch.runner import run_batch
    from ..batch.summary import build_summary, default_summary_path, write_summary
    from ..planning.plan import parse_size
    from ..progress import silenced_by_environment

    if retries < 0:
        raise TensorscaleError(f"--retries must be 0 or more, got {retries}")
    if jobs is not None and jobs < 1:
        raise TensorscaleError(f"--jobs must be at least 1, got {jobs}")
    if address is not None and executor != "ray":
        raise TensorscaleError("--address is for --executor ray; add --executor ray or drop --address")
    if memory_budget is not None and executor != "local":
        raise TensorscaleError("--memory-budget is for --executor local; Ray bounds memory per node itself")
    job_list = load_jobs(jobs_file)
    if verify_files:
        for job in job_list:
            job.options["verify_files"] = True
    summary_path = os.path.abspath(summary_path or default_summary_path(jobs_file))
    if not os.path.isdir(os.path.dirname(summary_path)):
        raise TensorscaleError(f"the folder for the summary {summary_path} does not exist; create it or pass --summary")
    if not os.access(os.path.dirname(summary_path), os.W_OK):
        raise TensorscaleError(
            f"cannot write the summary into {os.path.dirname(summary_path)}; pass --summary FILE elsewhere"
        )
    check_inputs_and_outputs(job_list, jobs_file)
    check_outputs(job_list, os.path.abspath(jobs_file), summary_path)
    slots = jobs or os.cpu_count() or 1

    if executor == "ray":
        from ..batch.ray_executor import RayExecutor

        runner = RayExecutor(address, slots, retries)
    else:
        from ..batch.local_executor import LocalExecutor

        budget = parse_size(memory_budget) if memory_budget is not None else default_memory_budget()
        runner = LocalExecutor(worker_count(slots, budget), retries)

    create_output_parents(job_list)  # only now: a mistake anywhere above leaves nothing behind
    overview = Overview(job_list, enabled=not quiet and not as_json and not silenced_by_environment())
    started = time.perf_counter()
    try:
        entries = run_batch(job_list, runner, overview)
    finally:
        runner.close()
    summary = build_summary(jobs_file, runner, entries, time.perf_counter() - started)
    write_summary(summary_path, summary)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        counts = summary["counts"]
        click.echo(
            f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
            f"in {summary['seconds']:.1f} s with {summary['workers']} {runner.name} worker(s); summary: {summary_path}"
        )
        for entry in entries:
            for note in entry.get("notes") or []:
                click.echo(f"tensorscale: job {entry['index']} note: {note}", err=True)
            if entry["status"] == "failed":
                click.echo(f"  job {entry['index']} failed: {entry['reason']}", err=True)
    if summary["counts"]["failed"]:
        sys.exit(1)
