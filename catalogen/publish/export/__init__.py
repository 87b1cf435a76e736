"""Training-set export of a finished run: one module per format over a shared shard writer.

main.py chooses the rows, their splits and shards, owns the export folder and drives the writers;
shards.py holds what every writer shares (shard, sample, atomic files, each shard's metadata
Parquet, the interface); hf.py, webdataset.py and imagefolder.py are the formats. Everything public
is importable from here, as it was from the one module. May import: run/ (results), media/, storage/.
"""

from catalogen.publish.export.hf import HFParquetWriter, hf_features
from catalogen.publish.export.imagefolder import ImageFolderWriter
from catalogen.publish.export.main import (
    DEFAULT_TEXT_COLUMNS, EXPORT_VERSION, FORMATS, LOCK, MANIFEST, PENDING, RESERVED, WRITERS, ExportOptions,
    Selection, assign_splits, check_folder, check_out, clear_previous, complete_columns, dedupe_distance,
    export_run, fingerprint_of, image_columns, is_local_only, load_results, owned_paths, parse_split,
    parse_where, plan_shards, provenance, read_image, sample_key, select_rows, split_fraction, text_column,
    text_status_column, where_mask, writer_for,
)
from catalogen.publish.export.shards import TMP, AtomicFile, DummyWriter, ExportError, Layout, Sample, Shard, json_line
from catalogen.publish.export.webdataset import WebDatasetWriter

__all__ = [
    "AtomicFile", "DEFAULT_TEXT_COLUMNS", "DummyWriter", "EXPORT_VERSION", "ExportError", "ExportOptions", "FORMATS",
    "HFParquetWriter", "ImageFolderWriter", "LOCK", "Layout", "MANIFEST", "PENDING", "RESERVED", "Sample", "Selection",
    "Shard", "TMP", "WRITERS", "WebDatasetWriter", "assign_splits", "check_folder", "check_out", "clear_previous",
    "complete_columns", "dedupe_distance", "export_run", "fingerprint_of", "hf_features", "image_columns",
    "is_local_only", "json_line", "load_results", "owned_paths", "parse_split", "parse_where", "plan_shards",
    "provenance", "read_image", "sample_key", "select_rows", "split_fraction", "text_column", "text_status_column",
    "where_mask", "writer_for",
]
