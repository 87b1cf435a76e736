"""Models: identity, resolution, checks and the per-process cache (loading), diffusers add-on
loaders, rembg's models, diffusion pipelines, conditioning, schedulers, long prompts; tiny/ builds
the tiny profile.

May import: catalogen.config and everything below it (media/, prompting/, catalog, storage/,
stopping). Never the stage contract, the run or above.
"""
