"""The cache format: what both stages agree on, importing nothing of either application.

    schema.py     record schema: FieldSpec, ViewRecord, ShardInfo, ShardError, compressor and spec rules
    fs.py         fsync, atomic publish, atomic writes (shards, manifest, checkpoints, metrics)
    base.py       the ShardFormat interface and the writer/reader bases
    payload.py    per-record zstd framing of the target fields (tar members)
    tar.py        WebDataset tar shards;  zarr.py: zarr v3 shards;  registry.py: formats by name
    manifest.py   the typed, frozen Manifest (from_json checks, to_json writes, digest seals)
    integrity.py  listed shard files present with their sizes (pre-flight of stage 2, verify)
    writer.py     CacheWriter: a cache folder's layout while it is built (shards, sidecars, leftovers),
                  and the manifest written last

Data flow: ViewRecords -> CacheWriter.open_shard -> shards + sidecars -> CacheWriter.publish(Manifest) -> manifest.json
-> load_manifest -> Manifest.open_shard / open_reader -> ViewRecords.
"""
from tec_cache.format.base import ShardFormat, ShardReader, ShardWriter
from tec_cache.format.integrity import Problem, check_shard_files
from tec_cache.format.manifest import (
                                       DIGEST_FIELD,
                                       MANIFEST_NAME,
                                       SCHEMA_VERSION,
                                       Manifest,
                                       ManifestError,
                                       ShardEntry,
                                       digest_problem,
                                       load_manifest,
)
from tec_cache.format.registry import FORMATS, get_format, open_reader, open_writer
from tec_cache.format.schema import FieldSpec, ShardError, ShardInfo, ViewRecord, parse_compressor, record_key

__all__ = [
    "DIGEST_FIELD", "FORMATS", "MANIFEST_NAME", "SCHEMA_VERSION", "FieldSpec", "Manifest", "ManifestError", "Problem",
    "ShardEntry", "ShardError", "ShardFormat", "ShardInfo", "ShardReader", "ShardWriter", "ViewRecord",
    "check_shard_files", "digest_problem", "get_format", "load_manifest", "open_reader", "open_writer",
    "parse_compressor", "record_key",
]
