"""Stages: one module per stage, each a `plan` and a `process` over a table of rows.

`STAGES` lists them in pipeline order (a run names the ones it uses, in its own order, under
`stages:`); `tasks.runner` runs any of them over one shard. Adding a stage is one module here
plus its line below: see catalogen/stage.py for the contract.
"""

from catalogen.stage import Stage
from tasks import caption, enhance, generate, remove_bg, style, upscale

STAGES: dict[str, Stage] = {
    enhance.NAME: enhance,
    generate.NAME: generate,
    remove_bg.NAME: remove_bg,
    style.NAME: style,
    upscale.NAME: upscale,
    caption.NAME: caption,
}
