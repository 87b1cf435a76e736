"""catalogen: Parquet catalogs in, finished imagery and provenance out."""

__version__ = "0.1.0"
