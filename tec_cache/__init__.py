"""Stage 1 of TEC: run a frozen base ViT over augmented views once and cache its targets in shards."""
