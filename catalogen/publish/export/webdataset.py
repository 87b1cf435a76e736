"""`--format webdataset`: tar shards of image, text and JSON per sample, each with its metadata Parquet.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

from catalogen.publish.export.shards import AtomicFile, Layout, Sample, Shard, _metadata_parquet, json_line

def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same samples give the same bytes (and sha256) on every export
    tar.addfile(info, io.BytesIO(data))


class WebDatasetWriter:
    """`webdataset`: `<split>/NNNNN.tar` of `<key>.<ext>`, `<key>.txt`, `<key>.json` per sample.

    Read with `wds.WebDataset(urls).decode("pil")`. Beside each tar, `<split>/NNNNN.parquet` holds the
    shard's metadata (key, text, provenance), written before the tar, which marks the shard done.
    """

    def __init__(self, layout: Layout, shard: Shard) -> None:
        self.layout = layout
        tar_name, meta_name = self.files(shard)
        self.meta_path = layout.out / meta_name
        self.file = AtomicFile(layout.out / tar_name, layout.tmp_dir)
        self.tar = tarfile.open(fileobj=self.file.handle, mode="w", format=tarfile.PAX_FORMAT)
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def files(shard: Shard) -> list[str]:
        return [f"{shard.split}/{shard.name}.tar", f"{shard.split}/{shard.name}.parquet"]

    @staticmethod
    def folder(shard: Shard) -> str | None:
        return None

    def write(self, sample: Sample) -> None:
        _tar_member(self.tar, sample.file_name, sample.image)
        _tar_member(self.tar, f"{sample.key}.txt", sample.text.encode())
        _tar_member(self.tar, f"{sample.key}.json", json_line(sample.metadata).encode())
        self.rows.append(sample.metadata)

    def close(self) -> None:
        _metadata_parquet(self.layout, self.rows, self.meta_path)
        self.tar.close()
        self.file.commit()
