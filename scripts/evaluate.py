"""Moved: offline evaluation is `recsys eval` (this alias is kept only to say so)."""

import sys

sys.exit("scripts/evaluate.py moved: run `recsys eval --ckpt CKPT [--data DIR] [--split test]` (recsys eval --help)")
