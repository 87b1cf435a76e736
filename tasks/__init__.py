"""catalogen's own stages: one module per stage, each a `plan` and a `process` over a table of rows.

They are registered like any package's stage, as `catalogen.stages` entry points in pyproject.toml,
each module saying where it sits in pipeline order with its `POSITION` (see catalogen/registry.py;
the contract is catalogen/stage.py). A run names the ones it uses, in its own order, under
`stages:`; `tasks.runner` runs any of them over one shard.
"""

from typing import Any

from catalogen.registry import stages


def __getattr__(name: str) -> Any:
    """`tasks.STAGES`: every registered stage by name, in pipeline order (the registry's table).

    Read on first use (PEP 562), so importing one stage module does not import every stage.
    """
    if name == "STAGES":
        return stages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
