"""The dataset contract: schema, vocabularies, streaming Parquet, ``Batch``."""

from recsys.data.arrow import DataError, split_files
from recsys.data.batch import Batch, make_kjt
from recsys.data.parquet import ParquetStream
from recsys.data.schema import (
    FeatureSpec,
    FeatureType,
    Schema,
    SchemaError,
    load_schema,
    parse_schema,
)
from recsys.data.vocab import DatasetInfo, Vocabulary

__all__ = [
    "Batch",
    "DataError",
    "DatasetInfo",
    "FeatureSpec",
    "FeatureType",
    "ParquetStream",
    "Schema",
    "SchemaError",
    "Vocabulary",
    "load_schema",
    "make_kjt",
    "parse_schema",
    "split_files",
]
