"""`--format hf`: Parquet shards that `datasets` loads with their images decoded.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from catalogen.publish.export.shards import AtomicFile, ExportError, Layout, Sample, Shard, _need

HF_ROWS_PER_GROUP = 100  # as `datasets` writes image datasets: small row groups for random access


def hf_features(schema: pa.Schema) -> Any:
    """`datasets` Features for key, image (decoded as an image), text and provenance."""
    datasets = _need("datasets", "hf")
    image_struct = datasets.Image().pa_type
    arrow = pa.schema([schema.field("key"), pa.field("image", image_struct), *list(schema)[1:]])
    try:
        features = datasets.Features.from_arrow_schema(arrow)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ExportError(f"--format hf: a results column has a type `datasets` cannot hold ({exc}); "
                          "export as webdataset or imagefolder instead") from None
    features["image"] = datasets.Image()
    return features


class HFParquetWriter:
    """`hf`: one Parquet file per shard, `data/<split>-NNNNN-of-NNNNN.parquet`.

    The `image` column is the `datasets` Image struct {bytes, path}, and the `datasets` Features sit in
    the Parquet schema metadata (key `huggingface`), so `load_dataset("parquet", ...)` decodes images.
    The file name follows the Hub's sharded pattern: `load_dataset(<out>)` finds the splits. The
    shard file is its own metadata Parquet.
    """

    def __init__(self, layout: Layout, shard: Shard) -> None:
        self.schema = hf_features(layout.schema).arrow_schema
        self.file = AtomicFile(layout.out / self.files(shard)[0], layout.tmp_dir)
        self.writer = pq.ParquetWriter(self.file.handle, self.schema, compression="zstd")
        self.buffer: list[dict[str, Any]] = []

    @staticmethod
    def files(shard: Shard) -> list[str]:
        return [f"data/{shard.split}-{shard.index:05d}-of-{shard.count:05d}.parquet"]

    @staticmethod
    def folder(shard: Shard) -> str | None:
        return None

    def write(self, sample: Sample) -> None:
        row = dict(sample.metadata)
        row["image"] = {"bytes": sample.image, "path": sample.file_name}
        self.buffer.append(row)
        if len(self.buffer) >= HF_ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.file.commit()
