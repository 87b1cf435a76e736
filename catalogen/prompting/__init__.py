"""Prompts from product fields: templates and their bounded sandbox.

May import: catalogen.catalog, storage/, stopping. Never config, models/ or above.
"""
