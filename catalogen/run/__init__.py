"""The run: plan and checks, recipes, dry run, batching, device leases, progress, the temporary
Prefect API, reproducing an image, and reading a run back whole (results, status/verify/clean).

May import: the stage contract (catalogen.registry, catalogen.stage) and everything below it
(models/, config, media/, prompting/, catalog, storage/, stopping). Never tasks/, flows/ or publish/.
"""
