"""recsys: embedding-table CTR models on torchrec, FBGEMM and Lightning."""

__version__ = "0.1.0"
