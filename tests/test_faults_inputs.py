"""Fault injection, inputs: damaged caches, hostile files and bad arguments.

* Every kind of damage to a cache makes `tec-cache verify` exit 1 naming the shard and the failed
  check, and `tec-train run` refuse it before step 1 (manifest, shard list, sizes) or, for damage
  only a checksum sees, at that shard's first batch, with no sample of it trained on.
* Pickled payloads in checkpoints and shards, hostile tar member names and decompression bombs are
  refused without running code or writing outside the output folder; any edit of a manifest
  (hypothesis) is refused with a ManifestError or by its checksum, never with a crash.
* Every CLI option given a wrong value fails with exit code 2 before any work, naming the option
  and what it expects, and creates nothing.
"""
from __future__ import annotations

import ast
import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, overload

import pytest
import torch
import typer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tec_cache import format as cache_format
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.build.cli import app as cache_app
from tec_cache.build.verify import verify_cache
from tec_cache.format.manifest import MANIFEST_NAME, ManifestError, load_manifest
from tec_train.cache_loader import CacheLoader, CompatibilityError, check_compatibility
from tec_train.cli import app as train_app
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK, make_image_folder, tiny_spec, tiny_state_dict
from tests.faultkit import ROOT, build_args

TRAIN = ["--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", "2", "--epochs", "1", "--num-workers", "0",
         "--device", "cpu", "--log-every", "1", "--ckpt-every", "100"]


def _cfg(data: Path, out: Path, ckpt: Path, **kw) -> BuildConfig:
    args = dict(data=data, out=out, checkpoint=ckpt, spec=tiny_spec(), views=2, shard_size=5, batch_size=8,
                num_workers=0, device="cpu")
    args.update(kw)
    return BuildConfig(**args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_cache: SimpleNamespace) -> SimpleNamespace:
    """20 images; a 2-view cache (4 shards of 5 per view-epoch) and one built with another seed."""
    other = tmp_path_factory.mktemp("faults-inputs") / "other"
    build_cache(_cfg(tiny_cache.data, other, tiny_cache.ckpt, views=1, seed=1))
    return SimpleNamespace(**vars(tiny_cache), other=other)


def _say(r) -> str:
    return " ".join(r.output.split())


# ---- damaged caches --------------------------------------------------------------------------


def _first_batch_reading(cache: Path, shard: str) -> int:
    """Index of the first step of `tec-train run ... --batch-size 2` (epoch 0) that reads ``shard``."""
    man = load_manifest(cache)
    entry = next(e for e in man.shards() if e.path == shard)
    images = {r.image_index for r in man.open_shard(entry)}
    with CacheLoader(man, batch_size=2, num_workers=0, verify=False) as loader:  # the trainer's loader, seed 0
        for i, b in enumerate(loader.epoch(0)):
            if images & set(b.image_index.tolist()):
                return i
    raise AssertionError(f"{shard} is not read in epoch 0")


def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


def _flip_target_byte(root: Path, shard: str) -> None:
    """One byte inside a record's target data: the tar structure stays valid, the size the same."""
    path = root / shard
    with tarfile.open(path) as tar:
        member = [m for m in tar if m.name.endswith(".targets.zst")][-1]
    _flip(path, member.offset_data + member.size // 2)


def _edit_manifest(root: Path, edit) -> None:
    raw = json.loads((root / MANIFEST_NAME).read_text())
    edit(raw)
    (root / MANIFEST_NAME).write_text(json.dumps(raw, indent=1))


def _count_edit(raw: dict) -> None:
    # A careful hand edit: the shard's count and the view-epoch's total, so the manifest stays well formed.
    raw["view_epochs"][0]["shards"][0]["num_samples"] -= 1
    raw["view_epochs"][0]["num_samples"] -= 1


def _other_build(tiny: SimpleNamespace, root: Path) -> None:
    shutil.copy(tiny.other / "ve000/shard-000000.tar", root / "ve000/shard-000000.tar")


# case: (damage, verify's exit code, what verify must print, what `tec-train run` must print, when
# it refuses: "preflight" = before step 1 with exit 2, "read" = at the shard's first batch with exit 1).
DAMAGE = {
    "flipped byte": (lambda t, r: _flip_target_byte(r, "ve000/shard-000002.tar"), 1,
                     ["BAD ve000/shard-000002.tar: shard:", "checksum: sha256"], ["ve000/shard-000002.tar: checksum: sha256"], "read"),
    "truncated shard": (lambda t, r: os.truncate(r / "ve001/shard-000001.tar", 10240), 1,
                        ["BAD ve001/shard-000001.tar: shard:", "size: 10240 bytes, manifest says"],
                        ["ve001/shard-000001.tar: size: 10240 bytes on disk, manifest lists"], "preflight"),
    "missing shard": (lambda t, r: (r / "ve000/shard-000003.tar").unlink(), 1,
                      ["BAD ve000/shard-000003.tar: missing: listed in the manifest but not on disk"],
                      ["ve000/shard-000003.tar: missing: listed in the manifest but not on disk"], "preflight"),
    "shard from another build": (_other_build, 1, ["BAD ve000/shard-000000.tar: shard:", "checksum: sha256"],
                                 ["ve000/shard-000000.tar", "checksum: sha256"], "read"),
    "manifest: shard count edited": (lambda t, r: _edit_manifest(r, _count_edit), 1,
                                     ["BAD manifest.json: checksum: the manifest was changed after the build",
                                      "BAD ve000/shard-000000.tar: shard:", "sample count: 5 records, manifest says 4"],
                                     ["manifest.json: checksum: the manifest was changed after the build"], "preflight"),
    "manifest: shard sha256 edited": (lambda t, r: _edit_manifest(r, lambda m: m["view_epochs"][1]["shards"][2].__setitem__("sha256", "0" * 64)), 1,
                                      ["BAD manifest.json: checksum", "BAD ve001/shard-000002.tar: shard:", "checksum: sha256"],
                                      ["manifest.json: checksum: the manifest was changed after the build"], "preflight"),
    "manifest: value edited": (lambda t, r: _edit_manifest(r, lambda m: m["targets"].__setitem__("tau", 2.0)), 1,
                               ["BAD manifest.json: checksum: the manifest was changed after the build", "1 bad shard(s)"],
                               ["manifest.json: checksum: the manifest was changed after the build"], "preflight"),
    "manifest: digest removed": (lambda t, r: _edit_manifest(r, lambda m: m.pop("manifest_sha256")), 1,
                                 ["BAD manifest.json: checksum: no manifest_sha256"], ["manifest.json: checksum: no manifest_sha256"], "preflight"),
    "manifest: truncated JSON": (lambda t, r: os.truncate(r / MANIFEST_NAME, 300), 1,
                                 ["manifest.json: not valid JSON"], ["--cache:", "manifest.json: not valid JSON"], "preflight"),
    "manifest: field of the wrong type": (lambda t, r: _edit_manifest(r, lambda m: m["targets"].__setitem__("grid", "4x4")), 1,
                                          ["manifest.json: field 'targets.grid' is str \"4x4\", expected [rows, cols] of positive ints"],
                                          ["--cache:", "field 'targets.grid'"], "preflight"),
    "manifest missing": (lambda t, r: (r / MANIFEST_NAME).unlink(), 1, ["is not a cache: no manifest.json"],
                         ["--cache:", "is not a cache: no manifest.json"], "preflight"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cache_is_refused(case: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    damage, verify_code, verify_says, train_says, when = DAMAGE[case]
    root = tmp_path / "cache"
    shutil.copytree(tiny.cache, root)
    damage(tiny, root)
    r = CliRunner().invoke(cache_app, ["verify", str(root)])
    assert r.exit_code == verify_code, _say(r)
    assert all(s in _say(r) for s in verify_says), _say(r)
    run = tmp_path / "run"
    r = CliRunner().invoke(train_app, ["run", "--run-dir", str(run), "--cache", str(root), *TRAIN])
    text = _say(r)
    assert all(s in text for s in train_says), text
    if when == "preflight":  # refused before step 1: nothing trained, nothing written
        assert r.exit_code == 2, text
        assert not run.exists()
    else:  # refused at the checksum of the shard's first batch: every earlier step ran, none after
        assert r.exit_code == 1 and "error: ShardError:" in text, text
        shard = "ve000/shard-000002.tar" if case == "flipped byte" else "ve000/shard-000000.tar"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").exists() else []
        assert steps == list(range(1, _first_batch_reading(tiny.cache, shard) + 1))


def test_damage_read_at_checksum_comes_late_enough_to_show_earlier_steps(tiny: SimpleNamespace) -> None:
    # The "read" cases above prove something only if the damaged shard is not read by the first step.
    assert _first_batch_reading(tiny.cache, "ve000/shard-000002.tar") >= 1
    assert _first_batch_reading(tiny.cache, "ve000/shard-000000.tar") >= 1
    # and the other build's shard has the size of ours, so only its checksum can tell them apart
    assert (tiny.other / "ve000/shard-000000.tar").stat().st_size == (tiny.cache / "ve000/shard-000000.tar").stat().st_size


# ---- hostile files ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this object creates ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_checkpoint(path: Path, marker: Path, **entries) -> Path:
    torch.save({**entries, "payload": _Payload(marker)}, path)
    return path


def test_the_payload_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    # The marker is a real witness: an unrestricted load of the same file does create it.
    marker = tmp_path / "ran"
    path = _hostile_checkpoint(tmp_path / "x.pth", marker, model={})
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["training checkpoint", "base checkpoint", "--init-from", "export", "online --checkpoint"])
def test_pickled_checkpoint_is_refused_without_running_code(where: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = _hostile_checkpoint(tmp_path / "evil.pth", marker, model=tiny_state_dict())
    run, out = tmp_path / "run", tmp_path / "out"
    if where == "training checkpoint":
        run.mkdir()
        _hostile_checkpoint(run / "checkpoint-00000003.pt", marker, format="tec-train-checkpoint", version=1)
        r = CliRunner().invoke(train_app, ["run", "--run-dir", str(run), "--cache", str(tiny.cache), *TRAIN])
        named = str(run / "checkpoint-00000003.pt")
    elif where == "base checkpoint":
        r = CliRunner().invoke(cache_app, build_args(tiny.data, out, evil))
        named = str(evil)
    elif where == "--init-from":
        r = CliRunner().invoke(train_app, ["run", "--run-dir", str(run), "--cache", str(tiny.cache), "--init-from", str(evil), *TRAIN])
        named = str(evil)
    elif where == "export":
        r = CliRunner().invoke(train_app, ["export", str(evil), "--out", str(out), "--model", "vit_tiny_patch8"])
        named = str(evil)
    else:
        r = CliRunner().invoke(train_app, ["run", "--run-dir", str(run), "--arch", TINY_ARCH, "--checkpoint", str(evil),
                                           "--data", str(tiny.data), "--img-size", str(TINY_IMG), "--patch-size", str(TINY_PATCH),
                                           "--topk", str(TINY_TOPK), *TRAIN])
        named = str(evil)
    text = _say(r)
    assert r.exit_code in (1, 2) and "error:" in text, text
    assert named in text and "weights" in text.lower(), text  # names the file, says why (weights-only load)
    assert not marker.exists()  # no code ran
    assert not out.exists()
    assert not run.exists() or [p.name for p in run.iterdir()] == ["checkpoint-00000003.pt"]


def _png_bomb(path: Path, width: int, height: int) -> None:
    """A real grey PNG of width x height zero pixels, compressed to a few hundred KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + the row
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_decompression_bomb_source_is_skipped_and_named(tiny: SimpleNamespace, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    _png_bomb(data / "class0" / "bomb.png", 20_000, 10_000)  # 200 MP, about 200 KB on disk
    out = tmp_path / "cache"
    r = CliRunner().invoke(cache_app, build_args(data, out, tiny.ckpt, views=1))
    text = _say(r)
    assert r.exit_code == 0, text
    assert "skipped class0/bomb.png:" in text and "refused as a decompression bomb" in text, text
    skipped = load_manifest(out).source.skipped
    assert skipped is not None
    assert [s["key"] for s in skipped] == ["class0/bomb.png"] and "bomb.png" in skipped[0]["error"]


def test_hostile_source_tar_writes_nothing_outside_the_cache(tiny: SimpleNamespace, tmp_path: Path) -> None:
    """Source tars are read by member offset, never extracted: absolute, '..' and link members
    cannot place a file anywhere, and only --out is written."""
    src = tmp_path / "src"
    src.mkdir()
    jpeg = next(tiny.data.glob("class0/*.jpg")).read_bytes()
    with tarfile.open(src / "part-000.tar", "w") as tar:
        for name in ("a/ok.jpg", "/tmp/abs-evil.jpg", "../../dotdot-evil.jpg", "../escape/evil.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))
        for kind, name in ((tarfile.SYMTYPE, "link.jpg"), (tarfile.LNKTYPE, "hard.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    tmp_before = {p.name for p in Path("/tmp").iterdir()}
    out = tmp_path / "cache"
    build_cache(_cfg(src, out, tiny.ckpt, views=1))
    after = sorted(str(p) for p in tmp_path.rglob("*") if not Path(p).is_relative_to(out))
    assert after == before  # nothing new outside --out
    assert "abs-evil.jpg" not in {p.name for p in Path("/tmp").iterdir()} - tmp_before
    assert not (tmp_path.parent / "dotdot-evil.jpg").exists() and not (ROOT / "dotdot-evil.jpg").exists()
    keys = [r.image_key for e in load_manifest(out).shards() for r in cache_format.open_reader("webdataset", out / e.path,
                                                                                           load_manifest(out).fields)]
    assert len(keys) == 4 and "part-000.tar/link" not in keys and "part-000.tar/hard" not in keys  # links are not images


_UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"), ("marshal", "load"),
    ("dill", "load"), ("dill", "loads"), ("shelve", "open"), ("yaml", "load"), ("yaml", "unsafe_load"),
    ("tarfile", "extractall"), ("zipfile", "extractall"), ("serialization", "add_safe_globals"),
}


def test_no_unsafe_deserialisation_in_the_code() -> None:
    """Static check of every module: no pickle/marshal/yaml loads, no tar/zip extraction, no global
    safe-globals allow-list, no eval/exec, and every torch.load passes weights_only=True."""
    bad = []
    for path in sorted([*(ROOT / "tec_cache").rglob("*.py"), *(ROOT / "tec_train").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                bad.append(f"{where}: {f.id}()")
            if isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else f.value.attr if isinstance(f.value, ast.Attribute) else ""
                if (owner, f.attr) in _UNSAFE_CALLS or f.attr in ("extractall", "extract"):
                    bad.append(f"{where}: {owner}.{f.attr}()")
                if (owner, f.attr) == ("torch", "load"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(wo := kw.get("weights_only"), ast.Constant) and wo.value is True):
                        bad.append(f"{where}: torch.load without weights_only=True")
                if (owner, f.attr) == ("np", "load") or (owner, f.attr) == ("numpy", "load"):
                    kw = {k.arg: k.value for k in node.keywords}
                    if isinstance(ap := kw.get("allow_pickle"), ast.Constant) and ap.value:
                        bad.append(f"{where}: np.load(allow_pickle=True)")
    assert not bad, bad


# ---- manifests edited anyhow (hypothesis) ----------------------------------------------------


@pytest.fixture(scope="module")
def bench(tiny: SimpleNamespace, tmp_path_factory) -> SimpleNamespace:
    """A copy of the cache whose manifest each example overwrites (readers never change shards)."""
    root = tmp_path_factory.mktemp("manifest-edits") / "cache"
    shutil.copytree(tiny.cache, root)
    text = (root / MANIFEST_NAME).read_text()
    return SimpleNamespace(root=root, text=text, raw=json.loads(text))


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _check_refused_cleanly(bench: SimpleNamespace, text: str | bytes) -> None:
    """Write ``text`` as the manifest; every reader refuses it cleanly unless it means the same as the original."""
    path = bench.root / MANIFEST_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        man = load_manifest(bench.root)
    except ManifestError:
        same = False
    else:
        same = _canonical(man.to_json()) == _canonical(bench.raw)
        problems = verify_cache(bench.root)
        assert bool(problems) != same, problems
        if same:
            check_compatibility(man, img_size=TINY_IMG, patch_size=TINY_PATCH)
        else:
            with pytest.raises(CompatibilityError, match="checksum"):
                check_compatibility(man, img_size=TINY_IMG, patch_size=TINY_PATCH)
        try:
            CacheLoader(man, batch_size=2, num_workers=0).close()
        except ValueError:
            pass  # e.g. a view-epoch too small for one batch: a clean refusal
    for args, codes in ((["verify", str(bench.root)], {0} if same else {1}), (["inspect", str(bench.root)], {0, 2})):
        r = CliRunner().invoke(cache_app, args)
        assert r.exit_code in codes and (r.exception is None or isinstance(r.exception, SystemExit)), (args, _say(r), r.exception)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6) | st.sampled_from(["[/]", "[bold]x", "../x", "/abs"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


_SETTINGS: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=120, **_SETTINGS)
@given(data=st.data())
def test_any_manifest_edit_is_refused_cleanly(bench: SimpleNamespace, data) -> None:
    """Any value of a real manifest replaced by arbitrary JSON, removed, or a key added: load fails
    with a ManifestError naming the field, or verify and the training pre-flight refuse it by its
    checksum; inspect exits 0 or 2, never with a traceback."""
    raw = json.loads(bench.text)
    path = data.draw(st.sampled_from([p for p in _paths(raw) if p]), label="path")
    parent = raw
    for p in path[:-1]:
        parent = parent[p]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "replace":
        parent[path[-1]] = data.draw(_JSON, label="value")
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]][data.draw(st.text(max_size=6), label="key")] = data.draw(_JSON, label="value")
    else:
        parent[path[-1]] = [parent[path[-1]]]
    _check_refused_cleanly(bench, json.dumps(raw))


@settings(max_examples=60, **_SETTINGS)
@given(data=st.data())
@example(data=None)
def test_manifest_bytes_damaged_anyhow_are_refused_cleanly(bench: SimpleNamespace, data) -> None:
    """Bytes flipped, cut or inserted anywhere in the file (and pathological JSON)."""
    if data is None:
        lone_surrogate = bench.text.replace('"kind": "folder"', '"kind": "\\ud800"')
        markup = bench.text.replace('"kind": "folder"', '"kind": "[/]"')
        for text in ("[" * 100_000, "1" * 5000, "\ufeff" + bench.text, "NaN", "", "\xff\xfe", lone_surrogate, markup):
            _check_refused_cleanly(bench, text)
        return
    blob = bytearray(bench.text.encode())
    pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
    action = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="action")
    if action == "flip":
        blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
    elif action == "cut":
        del blob[pos:]
    else:
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
    _check_refused_cleanly(bench, bytes(blob))


# ---- bad arguments ---------------------------------------------------------------------------


def _with(args: list[str], option: str, value: str | None) -> list[str]:
    """``args`` with ``option`` set to ``value`` (appended if absent; removed when value is None)."""
    out = list(args)
    if option in out:
        i = out.index(option)
        del out[i:i + 2]
    return out if value is None else [*out, option, value]


# (option, wrong value, what the error must say). {missing}: a path that does not exist; {file}: a
# regular file; {folder}: a folder that is not what the option wants; {other}: a finished cache
# built with other settings.
BUILD_BAD = [
    ("--log-seconds", "-1", "--log-seconds: must be a number >= 0, got -1"),
    ("--first-view", "-1", "--first-view: must be an integer >= 0, got -1"),
    ("--view-device", "gpu", "--view-device: expected one of ['auto', 'workers', 'device'], got 'gpu'"),
    ("--resize", "lanczos", "--resize: expected auto or one of ['pil-bicubic', 'torch-bicubic-u8', 'torch-bicubic-f32'], got 'lanczos'"),
    ("--data", "{missing}", "--data: no such file or folder"),
    ("--data", None, "--data is required: an image folder or a folder of .tar shards"),
    ("--checkpoint", "{missing}", "--checkpoint: no such file"),
    ("--checkpoint", "{folder}", "(expected the base model's weights file)"),
    ("--checkpoint", None, "--checkpoint is required"),
    ("--checkpoint-sha256", "abc", "--checkpoint-sha256: expected 64 hex digits (a sha256), got 'abc'"),
    ("--out", "{file}", "exists and is not a folder"),
    ("--out", "{other}", "the existing cache was built with views.seed = 1, this build asks for 0; use another --out or the same settings"),
    ("--out", None, "--out is required"),
    ("--pipeline", "nope", "--pipeline: unknown pipeline 'nope'"),
    ("--basemodel", "nope", "--basemodel: unknown base model 'nope'; expected one of"),
    ("--arch", "not_a_vit", "--arch: 'not_a_vit' is not a timm model name"),
    ("--arch", "resnet18", "--arch: 'resnet18' is not a plain timm VisionTransformer"),
    ("--img-size", "0", "--img-size: must be a positive integer, got 0"),
    ("--img-size", "30", "--img-size 30 is not a multiple of --patch-size 8"),
    ("--patch-size", "0", "--patch-size: must be a positive integer, got 0"),
    ("--depth", "0", "--depth: must be a positive integer, got 0"),
    ("--depth", "50", "does not match the base model: missing keys ['blocks.12."),
    ("--topk", "99", "--topk 99 exceeds the number of patches (16)"),
    ("--last-layers", "99", "--last-layers 99 exceeds the model depth 12"),
    ("--tau", "nan", "--tau: must be a positive number, got nan"),
    ("--views", "-2", "--views: must be a positive integer, got -2"),
    ("--views", "two", "Invalid value for '--views'"),
    ("--codec", "int4", "--codec: unknown codec 'int4'; expected one of ['fp16', 'int8', 'int8-coarse']"),
    ("--format", "parquet", "--format: unknown format 'parquet'; expected one of ['webdataset', 'zarr']"),
    ("--compressor", "zstd:99", "--compressor: compressor must be 'none' or 'zstd:LEVEL' (LEVEL in -131072..22)"),
    ("--shard-size", "0", "--shard-size: must be a positive integer, got 0"),
    ("--seed", "-1", "--seed: must be an integer >= 0, got -1"),
    ("--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("--num-workers", "-1", "--num-workers: must be >= 0, got -1"),
    ("--device", "tpu", "--device: 'tpu' is not a device (expected auto, cpu, cuda or cuda:N)"),
    ("--jpeg-quality", "101", "--jpeg-quality: must be in 1..100, got 101"),
]


@overload
def _fill(value: str, tiny: SimpleNamespace, tmp_path: Path) -> str: ...


@overload
def _fill(value: None, tiny: SimpleNamespace, tmp_path: Path) -> None: ...


def _fill(value: str | None, tiny: SimpleNamespace, tmp_path: Path) -> str | None:
    if value is None:
        return None
    return value.format(missing=tmp_path / "nope", file=tiny.ckpt, folder=tiny.data, other=tiny.other)


@pytest.mark.parametrize("option, value, says", BUILD_BAD, ids=[f"{o}={v}" for o, v, _ in BUILD_BAD])
def test_build_bad_option(option: str, value: str | None, says: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = sorted(p.name for p in tiny.other.rglob("*"))
    r = CliRunner().invoke(cache_app, _with(build_args(tiny.data, out, tiny.ckpt), option, _fill(value, tiny, tmp_path)))
    assert r.exit_code == 2 and says in _say(r), _say(r)
    assert option in _say(r) or option == "--depth"  # --depth 50 is named through the checkpoint it does not fit
    assert not out.exists() and sorted(p.name for p in tiny.other.rglob("*")) == before


def test_device_index_beyond_the_machine_is_a_bad_option(tiny: SimpleNamespace, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a one-GPU machine: cuda:3 is refused before any work, not when the model moves there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    r = CliRunner().invoke(cache_app, _with(build_args(tiny.data, out, tiny.ckpt), "--device", "cuda:3"))
    assert r.exit_code == 2 and "--device cuda:3: this machine has 1 CUDA device(s), expected cuda:0..cuda:0" in _say(r), _say(r)
    assert not out.exists()


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("target", ["{missing}", "{file}"])
def test_verify_inspect_bad_cache_argument(command: str, target: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    r = CliRunner().invoke(cache_app, [command, _fill(target, tiny, tmp_path)])
    assert r.exit_code == 2 and "CACHE: no such cache folder" in _say(r) and "expected the --out folder" in _say(r), _say(r)


ONLINE = ["--arch", TINY_ARCH, "--checkpoint", "{ckpt}", "--data", "{data}", "--img-size", str(TINY_IMG),
          "--patch-size", str(TINY_PATCH), "--topk", str(TINY_TOPK)]

# (mode, option, wrong value, what the error must say); mode "cache" trains from the tiny cache,
# "online" runs the tiny base model in the step, "none" gives neither.
RUN_BAD = [
    ("cache", "--run-dir", "{file}", "--run-dir: {file} exists and is not a folder"),
    ("cache", "--wandb", "team/proj", "--wandb: expected a W&B project name (no '/'; the entity comes from WANDB_ENTITY), got 'team/proj'"),
    ("cache", "--cache", "{missing}", "--cache: no such cache folder"),
    ("cache", "--cache", "{folder}", "--cache: {folder} is not a cache: no manifest.json"),
    ("cache", "--pipeline", "nope", "--pipeline: unknown pipeline 'nope'"),
    ("cache", "--objective", "nope", "--objective: expected one of tec, mae, got 'nope'"),
    ("cache", "--arch", TINY_ARCH, "--cache and --online-basemodel/--arch exclude each other"),
    ("cache", "--topk", "3", "--topk: only for online mode"),
    ("cache", "--view-epochs", "0", "--view-epochs: must be a positive integer, got 0"),
    ("cache", "--view-epochs", "3", "--view-epochs: the cache {cache} holds 2 view-epochs, fewer than the 3 asked for"),
    ("online", "--view-epochs", "1", "--view-epochs: takes the first K view-epochs of a --cache"),
    ("cache", "--cache", "pipe:cat {folder}/manifest.json", "--cache: pipe:cat {folder}/manifest.json: a pipe: cache needs {{path}}"),
    ("cache", "--cache", "http://127.0.0.1:9/cache", "--cache: http://127.0.0.1:9/cache/manifest.json: could not read after 4 attempts"),
    ("cache", "--cache-dir", "{folder}", "--cache-dir: the read-through folder is for a remote --cache (a URL)"),
    ("cache", "--val-cache", "{missing}", "--val-cache: no such cache folder"),
    ("cache", "--val-cache", "{folder}", "--val-cache: {folder} is not a cache: no manifest.json"),
    ("cache", "--val-every", "0", "--val-every: must be a positive integer, got 0"),
    ("none", "--model", "vit_tiny_patch8", "one of --cache CACHE or --online-basemodel NAME"),
    ("online", "--online-basemodel", "nope", "--online-basemodel: expected one of ibot1kbase, mae1k300ep, mae1kbase, mae1klarge, timm:NAME or hf-hub:ORG/REPO, got 'nope'"),
    ("online", "--checkpoint", "{missing}", "--checkpoint: online mode needs the base model's weights file"),
    ("online", "--checkpoint-sha256", "abc", "--checkpoint-sha256: expected 64 hex digits (a sha256), got 'abc'"),
    ("online", "--data", "{missing}", "--data: online mode needs an image folder or .tar shards"),
    ("online", "--arch", "resnet18", "--arch: 'resnet18' is not a plain timm VisionTransformer"),
    ("online", "--topk", "99", "--topk 99 exceeds the number of patches (16)"),
    ("online", "--tau", "nan", "--tau: must be a positive number, got nan"),
    ("online", "--last-layers", "99", "--last-layers 99 exceeds the model depth 12"),
    ("online", "--base-depth", "0", "--base-depth: must be a positive integer, got 0"),
    ("online", "--resize", "lanczos", "--resize: expected auto or one of ['pil-bicubic', 'torch-bicubic-u8', 'torch-bicubic-f32'], got 'lanczos'"),
    ("cache", "--resize", "pil-bicubic", "--resize: only for online mode"),
    ("cache", "--model", "vit_gigantic_patch8", "--model: unknown student model 'vit_gigantic_patch8'"),
    ("cache", "--model", "vit_tiny_patch4",
     "cannot train this student (--model, --img-size, --patch-size): student patch size 4 does not match the cache's 8"),
    ("cache", "--depth", "0", "--depth: must be a positive integer, got 0"),
    ("cache", "--img-size", "64", "student image size 64 does not match the cache's 32 (views.recipe.size)"),
    ("cache", "--patch-size", "0", "--patch-size: must be a positive integer, got 0"),
    ("cache", "--mask-ratio", "1.0", "--mask-ratio: must be in [0, 1), got 1.0"),
    ("cache", "--init-from", "{missing}", "--init-from: no such file"),
    ("cache", "--init-from", "{file}", "--init-from {file}: does not fit student vit_tiny_patch8"),
    ("cache", "--epochs", "-1", "--epochs: must be a positive integer, got -1"),
    ("cache", "--warmup-epochs", "-1", "--warmup-epochs: must be a number >= 0, got -1.0"),
    ("cache", "--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("cache", "--batch-size", "999", "fewer than one step of world_size * batch_size = 1 * 999 = 999 (lower --batch-size)"),
    ("cache", "--accum-iter", "0", "--accum-iter: must be a positive integer, got 0"),
    ("cache", "--accum-iter", "11", "--accum-iter 11 exceeds the 10 micro-batches per epoch"),
    ("cache", "--blr", "-1", "--blr: must be a positive number, got -1.0"),
    ("cache", "--lr", "inf", "--lr: must be a positive number, got inf"),
    ("cache", "--min-lr", "-1", "--min-lr: must be a number >= 0, got -1.0"),
    ("cache", "--weight-decay", "-1", "--weight-decay: must be a number >= 0, got -1.0"),
    ("cache", "--clip-grad", "0", "--clip-grad: must be a positive number, got 0.0"),
    ("cache", "--seed", "-1", "--seed: must be an integer >= 0, got -1"),
    ("cache", "--num-workers", "-1", "--num-workers: must be >= 0, got -1"),
    ("cache", "--view-order", "random", "--view-order: expected one of cycle, permute, got 'random'"),
    ("cache", "--ckpt-every", "0", "--ckpt-every: must be a positive integer, got 0"),
    ("cache", "--keep-last", "0", "--keep-last: must be a positive integer, got 0"),
    ("cache", "--log-every", "0", "--log-every: must be a positive integer, got 0"),
    ("cache", "--max-steps", "0", "--max-steps: must be a positive integer, got 0"),
    ("cache", "--device", "tpu", "--device: 'tpu' is not a device (expected auto, cpu, cuda or cuda:N)"),
    ("cache", "--amp", "int4", "--amp: expected one of auto, bf16, fp16, off, got 'int4'"),
    ("cache", "--amp", "bf16", "--amp bf16: mixed precision runs on CUDA only"),
    ("cache", "--epochs", "three", "Invalid value for '--epochs'"),
]


@pytest.mark.parametrize("mode, option, value, says", RUN_BAD, ids=[f"{o}={v}" for _, o, v, _ in RUN_BAD])
def test_run_bad_option(mode: str, option: str, value: str, says: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fill = dict(missing=tmp_path / "nope", file=tiny.ckpt, folder=tiny.data, ckpt=tiny.ckpt, data=tiny.data, cache=tiny.cache)
    base = {"cache": ["--cache", str(tiny.cache)], "online": [a.format(**fill) for a in ONLINE], "none": []}[mode]
    args = _with(["run", "--run-dir", str(run), *base, *TRAIN], option, value.format(**fill))
    r = CliRunner().invoke(train_app, args)
    text = _say(r)
    assert r.exit_code == 2 and says.format(**fill) in text, text
    assert option in text or option == "--model" and mode == "none"  # "--model" there is only the run's context
    assert not run.exists() or option == "--run-dir"


def _value_params(app: typer.Typer, command: str) -> set[str]:
    """The options (``--name``) and arguments (``METAVAR``) of ``command`` that take a value; typer
    may bring its own copy of click, so parameters are told apart by click's ``param_type_name``."""
    import typer.core
    import typer.main

    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    out = set()
    for p in group.commands[command].params:
        if p.param_type_name == "option":
            if not getattr(p, "is_flag", False):  # an option: click declares is_flag on Option only
                out.add(p.opts[0])
        else:
            out.add((p.metavar or p.name.upper()).strip("[]").rstrip("."))
    return out


def test_every_option_is_in_a_bad_value_table() -> None:
    """A new option without a wrong-value case fails here (flags without a value excepted)."""
    covered = {"build": {o for o, _, _ in BUILD_BAD}, "run": {o for _, o, _, _ in RUN_BAD} | {"--run-dir"},
               "export": {o for o, _, _ in EXPORT_BAD}}
    for name, app in (("build", cache_app), ("run", train_app), ("export", train_app)):
        options = {p for p in _value_params(app, name) if p.startswith("--")}
        assert options, f"no options read from {name}: the test checks nothing"
        assert options <= covered[name] | {"RUN_OR_CKPT"}, sorted(options - covered[name])


EXPORT_BAD = [
    ("RUN_OR_CKPT", "{missing}", "RUN_OR_CKPT: no such run dir or checkpoint file"),
    ("RUN_OR_CKPT", "{folder}", "RUN_OR_CKPT: {folder} is a folder without any complete checkpoint-*.pt"),
    ("--model", None, "--model: {ckpt} is not a tec-train checkpoint or export, so its encoder size must be given"),
    ("--model", "vit_gigantic_patch8", "--model: unknown student model 'vit_gigantic_patch8'"),
    ("--out", "{file}", "--out: {file} exists and is not a folder"),
]


@pytest.mark.parametrize("option, value, says", EXPORT_BAD, ids=[f"{o}={v}" for o, v, _ in EXPORT_BAD])
def test_export_bad_option(option: str, value: str | None, says: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "export"
    ref = tmp_path / "reference.pth"  # a reference TEC checkpoint needs --model for its student size
    from tec_train.student import build_student

    torch.save({"model": build_student("vit_tiny_patch8", pred_dim=192, att_heads=3, img_size=TINY_IMG, depth=3).state_dict()}, ref)
    fill = dict(missing=tmp_path / "nope", folder=tiny.data, file=tiny.ckpt, ckpt=ref)
    args = ["export", str(ref), "--out", str(out), "--model", "vit_tiny_patch8"]
    if option == "RUN_OR_CKPT":
        assert value is not None
        args[1] = value.format(**fill)
    else:
        args = _with(args, option, None if value is None else value.format(**fill))
    r = CliRunner().invoke(train_app, args)
    assert r.exit_code == 2 and says.format(**fill) in _say(r), _say(r)
    assert not out.exists()


# ---- bad arguments of show, plot, finetune, knn, linear, pipelines ---------------------------------

SHOW_BAD = [
    ("CACHE", "{missing}", "CACHE:"),
    ("CACHE", "{folder}", "CACHE:"),
    ("--n", "0", "--n: must be at least 1, got 0"),
    ("--n", "many", "Invalid value for '--n'"),
    ("--view-epoch", "9", "--view-epoch"),
    ("--head", "x", "--head"),
    ("--seed", "-1", "--seed"),
    ("--out", "{file}/x.png", "--out"),
]


@pytest.mark.parametrize("option, value, says", SHOW_BAD, ids=[f"{o}={v}" for o, v, _ in SHOW_BAD])
def test_show_bad_option(option: str, value: str, says: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "pics" / "views.png"
    fill = dict(missing=tmp_path / "nope", folder=tiny.data, file=tiny.ckpt)
    args = ["show", str(tiny.cache), "--out", str(out), "--n", "2"]
    if option == "CACHE":
        args[1] = value.format(**fill)
    else:
        args = _with(args, option, value.format(**fill))
    r = CliRunner().invoke(cache_app, args)
    assert r.exit_code == 2 and says in _say(r) and option in _say(r), _say(r)
    assert not out.exists()


PLOT_BAD = [
    ("RUN", "{missing}", "RUN {missing}: does not exist"),
    ("RUN", "{folder}", "has no metrics.jsonl"),
    ("--smooth", "0", "--smooth: must be at least 1, got 0"),
    ("--smooth", "x", "Invalid value for '--smooth'"),
    ("--out", "{file}/x.png", "--out"),
]


@pytest.mark.parametrize("option, value, says", PLOT_BAD, ids=[f"{o}={v}" for o, v, _ in PLOT_BAD])
def test_plot_bad_option(option: str, value: str, says: str, tiny: SimpleNamespace, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.001}\n{"step": 2, "loss": 0.9, "lr": 0.001}\n')
    out = tmp_path / "pics" / "curves.png"
    fill = dict(missing=tmp_path / "nope", folder=tiny.data, file=tiny.ckpt)
    args = ["plot", str(run), "--out", str(out)]
    if option == "RUN":
        args[1] = value.format(**fill)
    else:
        args = _with(args, option, value.format(**fill))
    r = CliRunner().invoke(train_app, args)
    assert r.exit_code == 2 and says.format(**fill) in _say(r) and option in _say(r), _say(r)
    assert not out.exists()


@pytest.fixture(scope="module")
def labelled(tiny: SimpleNamespace) -> Path:
    """An ImageNet-style train/ + val/ folder for the downstream commands."""
    root = tiny.root / "labelled"
    if not root.exists():
        for split in ("train", "val"):
            make_image_folder(root / split, n_per_class=2, bad=False)
    return root


# The base model's weights as the encoder: the cheapest source every downstream command takes.
_ENCODER = ["{ckpt}", "--arch", TINY_ARCH, "--patch-size", str(TINY_PATCH), "--data", "{labelled}", "--num-workers", "0",
            "--device", "cpu"]
# (option, wrong value, what the error must say), shared by knn and linear.
EVAL_BAD = [
    ("SOURCE", "{missing}", "SOURCE: no such file or folder"),
    ("--pipeline", "nope", "--pipeline: unknown pipeline 'nope'"),
    ("--data", "{missing}", "--data: {missing} needs ImageNet-style train/ and val/ class folders"),
    ("--fashion-mnist-dir", "{missing}", "--fashion-mnist: no folder {missing}"),
    ("--pool", "max", "--pool: expected one of avg, cls, got 'max'"),
    ("--model", "vit_gigantic_patch8", "--model: unknown student model 'vit_gigantic_patch8'"),
    ("--basemodel", "nope", "--basemodel: expected one of ibot1kbase, mae1k300ep, mae1kbase, mae1klarge, timm:NAME or hf-hub:ORG/REPO, got 'nope'"),
    ("--arch", "not_a_vit", "--arch: 'not_a_vit' is not a timm model name"),
    ("--img-size", "0", "--img-size: must be a positive integer, got 0"),
    ("--patch-size", "0", "--patch-size: must be a positive integer, got 0"),
    ("--depth", "0", "--depth: must be a positive integer, got 0"),
    ("--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("--num-workers", "-1", "--num-workers: must be >= 0, got -1"),
    ("--device", "tpu", "--device: 'tpu' is not a device (expected auto, cpu, cuda or cuda:N)"),
    ("--crop-pct", "2", "--crop-pct: must be in (0, 1], got 2.0"),
    ("--train-subset", "0", "--train-subset: must be a positive integer, got 0"),
    ("--val-subset", "0", "--val-subset: must be a positive integer, got 0"),
    ("--seed", "-1", "--seed: must be an integer >= 0, got -1"),
    ("--out-json", "{file}/r.json", "--out-json: cannot create the folder {file}"),
]
KNN_BAD = EVAL_BAD + [
    ("--k", "0", "--k: must be a positive integer, got 0"),
    ("--temperature", "0", "--temperature: must be a positive number, got 0.0"),
    ("--k", "x", "Invalid value for '--k'"),
]
LINEAR_BAD = EVAL_BAD + [
    ("--epochs", "0", "--epochs: must be a positive integer, got 0"),
    ("--lr", "nan", "--lr: must be a positive number, got nan"),
    ("--weight-decay", "-1", "--weight-decay: must be a number >= 0, got -1.0"),
    ("--warmup-epochs", "-1", "--warmup-epochs: must be a number >= 0, got -1.0"),
    ("--optimizer", "adam", "--optimizer: expected one of lars, sgd, got 'adam'"),
]


def _downstream_args(command: str, option: str, value: str | None, fill: dict, extra: list[str]) -> list[str]:
    encoder = _ENCODER if command != "finetune" else _with(_ENCODER, "--patch-size", None)  # finetune takes the arch's
    args = [command, *(a.format(**fill) for a in encoder), *extra]
    if option == "SOURCE":
        assert value is not None
        args[1] = value.format(**fill)
    elif option == "--fashion-mnist-dir":
        assert value is not None
        args = _with(args, "--data", None) + [option, value.format(**fill)]
    else:
        args = _with(args, option, None if value is None else value.format(**fill))
    return args


@pytest.mark.parametrize("command, option, value, says",
                         [("knn", *c) for c in KNN_BAD] + [("linear", *c) for c in LINEAR_BAD],
                         ids=[f"knn {o}={v}" for o, v, _ in KNN_BAD] + [f"linear {o}={v}" for o, v, _ in LINEAR_BAD])
def test_knn_linear_bad_option(command: str, option: str, value: str, says: str, tiny: SimpleNamespace,
                               labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tec_train.evaluate as evaluate

    def no_work(*a, **k):
        raise AssertionError("features were extracted despite a bad option")

    monkeypatch.setattr(evaluate, "extract_features", no_work)
    fill = dict(missing=tmp_path / "nope", file=tiny.ckpt, ckpt=tiny.ckpt, labelled=labelled)
    r = CliRunner().invoke(train_app, _downstream_args(command, option, value, fill, []))
    text = _say(r)
    assert r.exit_code == 2 and says.format(**fill) in text, text
    assert option in text or option == "--fashion-mnist-dir", text


FINETUNE_BAD = [
    ("SOURCE", "{missing}", "SOURCE: no such file or folder"),
    ("--log-every", "0", "--log-every: must be a positive integer, got 0"),
    ("--wandb", " ", "--wandb: expected a W&B project name (no '/'; the entity comes from WANDB_ENTITY), got ' '"),
    ("--run-dir", "{file}", "--run-dir: {file} exists and is not a folder"),
    ("--pipeline", "nope", "--pipeline: unknown pipeline 'nope'"),
    ("--data", "{missing}", "--data: no such folder"),
    ("--fashion-mnist-dir", "{missing}", "--fashion-mnist: no folder {missing}"),
    ("--model", "vit_gigantic_patch8", "--model: unknown student model 'vit_gigantic_patch8'"),
    ("--basemodel", "nope", "--basemodel: expected one of ibot1kbase, mae1k300ep, mae1kbase, mae1klarge, timm:NAME or hf-hub:ORG/REPO, got 'nope'"),
    ("--arch", "not_a_vit", "--arch"),
    ("--checkpoint", "{ckpt}", "--checkpoint: give the base-model weights once, as SOURCE or --checkpoint"),
    ("--img-size", "0", "--img-size: must be a positive integer, got 0"),
    ("--drop-path", "1", "--drop-path: must be in [0, 1), got 1.0"),
    ("--epochs", "0", "--epochs: must be a positive integer, got 0"),
    ("--warmup-epochs", "-1", "--warmup-epochs: must be a number >= 0, got -1.0"),
    ("--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("--batch-size", "3", "--batch-size: Mixup/CutMix needs an even batch size, got 3"),
    ("--accum-iter", "0", "--accum-iter: must be a positive integer, got 0"),
    ("--blr", "0", "--blr: must be a positive number, got 0.0"),
    ("--lr", "inf", "--lr: must be a positive number, got inf"),
    ("--min-lr", "-1", "--min-lr: must be a number >= 0, got -1.0"),
    ("--layer-decay", "0", "--layer-decay: must be in (0, 1], got 0.0"),
    ("--weight-decay", "-1", "--weight-decay: must be a number >= 0, got -1.0"),
    ("--clip-grad", "0", "--clip-grad: must be a positive number, got 0.0"),
    ("--aa", "bogus-m9", "--aa: 'bogus-m9' is not a timm auto-augment string"),
    ("--reprob", "2", "--reprob: must be in [0, 1], got 2.0"),
    ("--mixup", "-1", "--mixup: must be a number >= 0, got -1.0"),
    ("--cutmix", "-1", "--cutmix: must be a number >= 0, got -1.0"),
    ("--mixup-prob", "2", "--mixup-prob: must be in [0, 1], got 2.0"),
    ("--mixup-switch-prob", "2", "--mixup-switch-prob: must be in [0, 1], got 2.0"),
    ("--mixup-mode", "pixel", "--mixup-mode: expected one of batch, pair, elem, got 'pixel'"),
    ("--smoothing", "1", "--smoothing: must be in [0, 1), got 1.0"),
    ("--crop-pct", "0", "--crop-pct: must be in (0, 1], got 0.0"),
    ("--train-subset", "0", "--train-subset: must be a positive integer, got 0"),
    ("--val-subset", "0", "--val-subset: must be a positive integer, got 0"),
    ("--seed", "-1", "--seed: must be an integer >= 0, got -1"),
    ("--num-workers", "-1", "--num-workers: must be >= 0, got -1"),
    ("--device", "tpu", "--device: 'tpu' is not a device"),
    ("--amp", "int4", "--amp: expected one of auto, bf16, fp16, off, got 'int4'"),
    ("--keep-last", "0", "--keep-last: must be a positive integer, got 0"),
    ("--epochs", "x", "Invalid value for '--epochs'"),
]


@pytest.mark.parametrize("option, value, says", FINETUNE_BAD, ids=[f"{o}={v}" for o, v, _ in FINETUNE_BAD])
def test_finetune_bad_option(option: str, value: str, says: str, tiny: SimpleNamespace, labelled: Path,
                             tmp_path: Path) -> None:
    run = tmp_path / "ft"
    fill = dict(missing=tmp_path / "nope", file=tiny.ckpt, ckpt=tiny.ckpt, labelled=labelled)
    extra = ["--run-dir", str(run), "--epochs", "1", "--batch-size", "2"]
    r = CliRunner().invoke(train_app, _downstream_args("finetune", option, value, fill, extra))
    text = _say(r)
    assert r.exit_code == 2 and says.format(**fill) in text, text
    assert option in text or option == "--fashion-mnist-dir", text
    assert not run.exists() or option == "--run-dir"


PIPELINES_BAD = [("NAME", "nope", "unknown pipeline 'nope'"), ("NAME", "{missing}.toml", "no such pipeline file")]


@pytest.mark.parametrize("option, value, says", PIPELINES_BAD, ids=[v for _, v, _ in PIPELINES_BAD])
def test_pipelines_bad_name(option: str, value: str, says: str, tmp_path: Path) -> None:
    r = CliRunner().invoke(train_app, ["pipelines", value.format(missing=tmp_path / "nope")])
    assert r.exit_code == 2 and says in _say(r), _say(r)


def test_every_downstream_option_is_in_a_bad_value_table() -> None:
    """The same rule as test_every_option_is_in_a_bad_value_table, for the other commands."""
    tables = {"show": (cache_app, SHOW_BAD), "plot": (train_app, PLOT_BAD), "knn": (train_app, KNN_BAD),
              "linear": (train_app, LINEAR_BAD), "finetune": (train_app, FINETUNE_BAD), "pipelines": (train_app, PIPELINES_BAD)}
    for name, (app, table) in tables.items():
        covered = {row[0] for row in table}
        params = _value_params(app, name)
        assert params, f"no parameters read from {name}: the test checks nothing"
        assert params <= covered | {"--help"}, (name, sorted(params - covered))
