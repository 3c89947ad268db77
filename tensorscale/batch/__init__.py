"""`tensorscale batch`: many conversions from one jobs file, run in parallel and resumable.

A model zoo (every size x several multipliers) is converted without babysitting: the whole file is
validated before anything runs, jobs and their output shards run in worker processes (or Ray tasks), a
failed job does not stop the others, and a rerun skips every job whose output still matches its manifest.

Modules, one job each: `jobs` (file schema), `tasks` (what a worker runs for one shard), `local_executor`
and `ray_executor` (where shards run), `resume` (is an existing output finished?), `runner` (job
lifecycle), `overview` (progress) and `summary` (the JSON written at the end).
"""
