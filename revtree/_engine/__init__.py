"""The engine: one call of a sequence, its nodes, their backward (see ``revtree/README.md``)."""
