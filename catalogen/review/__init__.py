"""Choosing what ships: the decisions a person makes in `catalogen review`, and (to come) the rules
that rank candidates and gate them."""
