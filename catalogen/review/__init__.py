"""Choosing what ships: the rules that rank candidates and gate them (rules.py, select.py), the
decisions a person makes in `catalogen review` (decisions.py), the states both give (state.py), and
the regenerations those decisions ask for (regenerate.py)."""
