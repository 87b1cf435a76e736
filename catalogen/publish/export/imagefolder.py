"""`--format imagefolder`: a folder per shard of images with caption sidecars and metadata.jsonl.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from catalogen.publish.export.shards import Layout, Sample, Shard, _metadata_parquet, json_line
from catalogen.storage.store import fsync_path, temp_folder

FSYNC_THREADS = 16  # an imagefolder shard's files are flushed together (see _fsync_tree)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, then the folder itself, to disk.

    In parallel: the filesystem's journal commits concurrent fsyncs together. Measured on ext4,
    512 small files: 2.6 s one after another, 0.09-0.16 s from 8-32 threads.
    """
    with ThreadPoolExecutor(max_workers=FSYNC_THREADS) as pool:
        list(pool.map(fsync_path, folder.iterdir()))
    fsync_path(folder)


class ImageFolderWriter:
    """`imagefolder`: `<split>/NNNNN/` of `<key>.<ext>` + `<key>.txt` caption sidecars, and metadata.jsonl.

    metadata.jsonl (`file_name`, then key, text and the `Layout.complete` columns) is what
    `load_dataset("imagefolder", data_dir=<out>)` reads; `<split>/NNNNN.parquet` holds every
    provenance column. The shard's folder is filled under a temporary name and renamed into place
    whole, after its files are flushed: one rename per shard, not two fsyncs per file.
    """

    def __init__(self, layout: Layout, shard: Shard) -> None:
        self.layout = layout
        self.final = layout.out / self.folder(shard)
        self.meta_path = layout.out / self.files(shard)[1]
        layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.dir = temp_folder(layout.tmp_dir, f"{shard.split}-{shard.name}")
        self.columns = ("key", "text", *layout.complete)
        self.rows: list[tuple[str, dict[str, Any]]] = []  # (file name, metadata)

    @staticmethod
    def files(shard: Shard) -> list[str]:
        return [f"{shard.split}/{shard.name}/metadata.jsonl", f"{shard.split}/{shard.name}.parquet"]

    @staticmethod
    def folder(shard: Shard) -> str | None:
        return f"{shard.split}/{shard.name}"

    def write(self, sample: Sample) -> None:
        (self.dir / sample.file_name).write_bytes(sample.image)
        (self.dir / f"{sample.key}.txt").write_text(sample.text, encoding="utf-8")
        self.rows.append((sample.file_name, sample.metadata))

    def _line(self, file_name: str, row: dict[str, Any]) -> str:
        record = {"file_name": file_name}
        for column in self.columns:
            record[column] = row[column]
        return json_line(record) + "\n"

    def close(self) -> None:
        lines = [self._line(name, row) for name, row in self.rows]
        (self.dir / "metadata.jsonl").write_text("".join(lines), encoding="utf-8")
        _fsync_tree(self.dir)
        _metadata_parquet(self.layout, [row for _, row in self.rows], self.meta_path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.final, ignore_errors=True)  # only there if its Parquet went missing: redone
        os.replace(self.dir, self.final)
        fsync_path(self.final.parent)
