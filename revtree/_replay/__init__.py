"""What a recomputed call must see again: one module per kind of state (see ``_protocol``)."""
