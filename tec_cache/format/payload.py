"""Per-record target payload framing: one blob per view holding every target field.

Data flow: tar writer -> ``encode_targets`` -> ``{key}.targets.zst|.bin`` member -> tar reader ->
``split_targets`` -> ``decode_field_into`` per field. Each field is its raw little-endian C-order bytes;
compressed, each is its own zstd frame (separate frames compress 5% better than one: each field has
its own statistics), the frames in sorted field-name order behind a header of their lengths (uint32
LE each); a field whose spec says ``compress: false`` is its raw bytes in that place (zstd buys it
nothing worth its time). Uncompressed, the raw bytes are concatenated in the same order with no
header (the specs give the sizes).
"""
from __future__ import annotations

import sys
from typing import Any

import numcodecs
import numpy as np

from tec_cache.format.schema import FieldSpec, ShardError

__all__ = ["decode_field_into", "encode_targets", "le_bytes", "make_codec", "split_targets", "zstd_content_size"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def make_codec(level: int | None) -> Any:
    """The numcodecs zstd codec of a parsed compressor level; None for no compression."""
    return None if level is None else numcodecs.Zstd(level=level)


def le_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian C-order bytes, the on-disk form of a field in the tar format."""
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def encode_targets(fields: dict[str, np.ndarray], specs: dict[str, FieldSpec], codec: Any) -> bytes:
    """One record's target payload: the fields of ``specs`` (sorted) framed as the module docstring says."""
    names = sorted(specs)
    raws = [le_bytes(fields[name]) for name in names]
    if codec is None:
        return b"".join(raws)
    frames = [codec.encode(raw) if specs[name].compress else raw for name, raw in zip(names, raws)]
    return np.array([len(fr) for fr in frames], dtype="<u4").tobytes() + b"".join(frames)


def split_targets(payload: bytes | memoryview, specs: dict[str, FieldSpec], compressed: bool,
                  where: str) -> dict[str, bytes | memoryview]:
    """One record's targets member cut into per-field payloads (sorted field-name order)."""
    names = sorted(specs)
    if compressed:
        head = 4 * len(names)
        if len(payload) < head:
            raise ShardError(f"{where}: targets size: {len(payload)} bytes, shorter than its {head}-byte header")
        lengths = np.frombuffer(payload[:head], dtype="<u4").tolist()
        if head + sum(lengths) != len(payload):
            raise ShardError(f"{where}: targets size: header lists {sum(lengths)} bytes of frames, member holds {len(payload) - head}")
    else:
        lengths = [specs[n].nbytes() for n in names]
        if sum(lengths) != len(payload):
            raise ShardError(f"{where}: targets size: {len(payload)} bytes, expected {sum(lengths)}")
        head = 0
    out, start = {}, head
    for name, n in zip(names, lengths):
        out[name] = payload[start:start + n]
        start += n
    return out


def decode_field_into(payload: bytes | memoryview, name: str, spec: FieldSpec, codec: Any, where: str,
                      out: np.ndarray) -> None:
    """Decode one field's payload straight into ``out`` (C-contiguous, ``spec.nbytes()`` bytes: a
    row of the loader's batch buffer), size-checked first. Raw payloads are copied once; zstd
    frames are decompressed in place."""
    expected = spec.nbytes()
    dest = out.reshape(-1).view(np.uint8)  # a view: out is contiguous
    if dest.size != expected:
        raise ValueError(f"{where}: field {name}: output buffer holds {dest.size} bytes, expected {expected}")
    if codec is None or not spec.compress:
        if len(payload) != expected:
            raise ShardError(f"{where}: field {name} size: {len(payload)} bytes, expected {expected}")
        dest[:] = np.frombuffer(payload, np.uint8)
    else:
        # Decompress only into a buffer of exactly the spec's size, and only a frame that declares
        # that size: numcodecs fills `out` without reporting a shorter result, and the size cap is
        # what keeps a zstd bomb from allocating more than one field.
        declared = zstd_content_size(payload)
        if declared != expected:
            raise ShardError(f"{where}: field {name} size: zstd frame declares {declared} bytes, expected {expected}")
        try:
            codec.decode(payload, out=dest)
        except (RuntimeError, ValueError) as e:
            raise ShardError(f"{where}: field {name} data: zstd decode failed: {e}") from e
    if sys.byteorder != "little":  # the stored bytes are little-endian
        out.byteswap(inplace=True)


def zstd_content_size(frame: bytes | memoryview) -> int | None:
    """Frame_Content_Size from a zstd frame header (RFC 8878 3.1.1.1), None if absent or not zstd."""
    if len(frame) < 5 or frame[:4] != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
    if fcs_size == 0:
        return None
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # window descriptor, dictionary id
    raw = frame[start : start + fcs_size]
    if len(raw) != fcs_size:
        return None
    return int.from_bytes(raw, "little") + (256 if fcs_size == 2 else 0)
