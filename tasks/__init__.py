"""Stages: one module per stage, each a `plan` and a `process` over a table of rows.

`STAGES` lists them in pipeline order; `tasks.runner` wraps any of them in a Prefect task.
"""

from catalogen.stage import Stage
from tasks import caption, generate

STAGES: dict[str, Stage] = {generate.NAME: generate, caption.NAME: caption}
