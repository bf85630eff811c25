"""Stage 2 of the TEC pipeline: train student ViTs from cached base-model targets, then export them."""
