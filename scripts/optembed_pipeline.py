"""Moved: OptEmbed's three stages are `recsys optembed run` (this alias is kept only to say so)."""

import sys

sys.exit(
    "scripts/optembed_pipeline.py moved: run `recsys optembed run --config MODEL.yaml "
    "--config configs/embedding/optembed_supernet.yaml --out DIR` (recsys optembed run --help)"
)
