"""End-to-end stage-1 builds: content, extension, bad inputs, CLI. Kills, full disks, lost ranks and
damaged caches: tests/test_faults_*.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.build.cli import app
from tec_cache.core.basemodels import load_base_model
from tec_cache.core.codecs import get_codec
from tec_cache.core.targets import extract_targets, normalise_images
from tec_cache.core.views import decode_view
from tec_cache.format.manifest import load_manifest
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK, add_skimage_photos, make_image_folder, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
BAD = {"class0/zero.jpg", "class0/notimage.jpg", "class0/truncated.jpg"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("src") / "data", n_per_class=5)
    add_skimage_photos(root)
    return root


def _cfg(data, out, ckpt, **kw) -> BuildConfig:
    args = dict(data=data, out=out, checkpoint=ckpt, spec=tiny_spec(), views=2, shard_size=5, batch_size=4,
                num_workers=0, device="cpu")
    args.update(kw)
    return BuildConfig(**args)


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, manifest excluded (it holds build timings)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _manifest_sans_stats(root: Path) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    m["stats"].pop("build")
    m["base_model"].pop("checkpoint")
    m.pop("manifest_sha256")  # covers the timings above
    return m


def _build_args(data, out, ckpt, *extra: str) -> list[str]:
    return ["build", "--data", str(data), "--out", str(out), "--checkpoint", str(ckpt), "--arch", TINY_ARCH,
            "--img-size", str(TINY_IMG), "--patch-size", str(TINY_PATCH), "--topk", str(TINY_TOPK), "--views", "2",
            "--shard-size", "5", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference_cache(data_dir, tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    build_cache(_cfg(data_dir, out, tiny_ckpt))
    return out


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_build_content(fmt, data_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "cache"
    res = build_cache(_cfg(data_dir, out, tiny_ckpt, format=fmt, codec="fp16"))
    man = load_manifest(out)
    n_src = man.source.num_images
    skipped = {s["key"] for s in man.source.skipped}
    assert skipped == BAD and {s["key"] for s in res.skipped_images} == BAD
    assert man.num_view_epochs == 2
    assert (man.targets.num_patches, man.targets.dim, man.targets.heads, man.targets.topk, man.targets.last_layers,
            man.targets.tau) == (16, 192, 3, 3, 2, 1.8)
    model, _ = load_base_model(tiny_spec(), tiny_ckpt)
    codec = get_codec("fp16")
    seen = {}
    for e in man.shards():
        reader = man.open_shard(e, verify=True)
        recs = list(reader)
        assert len(recs) == e.num_samples
        pixels = torch.stack([decode_view(r.image) for r in recs])
        feat, att, idx = extract_targets(model, normalise_images(pixels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                         topk=3, last_layers=2)
        dfeat, datt, didx = codec.decode({k: torch.from_numpy(__import__("numpy").stack([r.fields[k] for r in recs])) for k in man.fields})
        # The stored image is exactly what the base model saw: its targets recomputed now agree.
        torch.testing.assert_close(dfeat, feat, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(datt, att, atol=2e-2, rtol=1e-2)
        assert torch.equal(didx, idx)
        for r in recs:
            assert r.view_epoch == e.view_epoch
            seen.setdefault(r.view_epoch, set()).add(r.image_key)
    good = n_src - len(BAD)
    assert all(len(keys) == good for keys in seen.values())
    assert {"photos/astronaut.png", "class0/cmyk.jpg", "class0/palette.png"} <= seen[0]
    assert man.stats.fields["feat"].count == 2 * good * 16 * 192


def test_formats_hold_the_same_records(data_dir, tiny_ckpt, tmp_path):
    caches = {}
    for fmt in ("webdataset", "zarr"):
        out = tmp_path / fmt
        build_cache(_cfg(data_dir, out, tiny_ckpt, format=fmt, views=1))
        man = load_manifest(out)
        caches[fmt] = [(r.key, r.image, {k: v.tobytes() for k, v in r.fields.items()})
                       for e in man.shards() for r in man.open_shard(e)]
    assert caches["webdataset"] == caches["zarr"]


def test_extend_views_adds_only_missing(data_dir, tiny_ckpt, tmp_path, reference_cache):
    out = tmp_path / "cache"
    build_cache(_cfg(data_dir, out, tiny_ckpt, views=1))
    first = {p: os.stat(out / p).st_mtime_ns for p in _tree(out) if p.startswith("ve000/")}
    res = build_cache(_cfg(data_dir, out, tiny_ckpt, views=2))
    assert res.shards_skipped == len(first) // 2  # shard + sidecar per chunk
    assert {p: os.stat(out / p).st_mtime_ns for p in first} == first
    assert _tree(out) == _tree(reference_cache)
    assert _manifest_sans_stats(out) == _manifest_sans_stats(reference_cache)


def test_coarse_codec_keeps_what_the_losses_see_in_fewer_bytes(data_dir, tiny_ckpt, tmp_path, reference_cache):
    """An int8-coarse cache of the same inputs: verifies, holds the same views, its decoded targets
    agree with int8's as the losses see them, and its shards are smaller."""
    import numpy as np

    from tec_cache.build.verify import verify_cache

    out = tmp_path / "cache"
    build_cache(_cfg(data_dir, out, tiny_ckpt, codec="int8-coarse"))
    assert verify_cache(out) == []
    coarse, fine = load_manifest(out), load_manifest(reference_cache)
    # The same arrays; zstd is worth it on the coarse logit codes only (benchmarks/bench_fields.py).
    assert coarse.codec.name == "int8-coarse"
    assert {k: (f.dtype, f.shape) for k, f in coarse.fields.items()} == {k: (f.dtype, f.shape) for k, f in fine.fields.items()}
    assert [k for k in coarse.fields if coarse.fields[k].compress != fine.fields[k].compress] == ["att_q"]
    assert coarse.stats.total_bytes < fine.stats.total_bytes  # tiny views: the JPEGs are most of it

    def decoded(man):
        recs = [r for e in man.shards() for r in man.open_shard(e, verify=True)]
        fields = {k: torch.from_numpy(np.stack([r.fields[k] for r in recs])) for k in man.fields}
        return [r.image for r in recs], get_codec(man.codec.name).decode(fields)

    (img_c, (fc, ac, ic)), (img_f, (ff, af, i_f)) = decoded(coarse), decoded(fine)
    assert img_c == img_f and torch.equal(ic, i_f)

    def norm_tokens(x):
        return (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-6).sqrt()

    cos = torch.nn.functional.cosine_similarity(norm_tokens(fc).flatten(1), norm_tokens(ff).flatten(1), dim=1)
    assert cos.min() > 0.98, cos.min()
    lp, lq = torch.log_softmax(af / 1.8, -1), torch.log_softmax(ac / 1.8, -1)
    assert (lp.exp() * (lp - lq)).sum(-1).mean() < 1e-3


def test_first_view_builds_the_views_another_cache_does_not_hold(data_dir, tiny_ckpt, tmp_path, reference_cache):
    """--first-view 1: view-epoch 0 holds view 1 of every image, exactly what view-epoch 1 of a
    cache built from view 0 holds (same pixels, same targets); the manifest says so, and a resume
    with another --first-view is refused."""
    from tec_cache.format import get_format

    out = tmp_path / "cache"
    build_cache(_cfg(data_dir, out, tiny_ckpt, views=1, first_view=1))
    man, ref = load_manifest(out), load_manifest(reference_cache)
    assert man.views.first_view == 1 and ref.views.first_view == 0 and "first_view" not in ref.views.extra
    fmt = get_format(man.format.name)

    def records(cache, view_epoch):
        m = load_manifest(cache)
        return [(r.key, r.image, {k: v.tobytes() for k, v in r.fields.items()})
                for e in m.shards(view_epoch) for r in fmt.open_reader(cache / e.path, m.fields, m.format.compressor)]

    mine, theirs = records(out, 0), records(reference_cache, 1)
    assert len(mine) == len(theirs) > 0 and mine == theirs
    assert records(reference_cache, 0) != theirs  # view 0 is another view
    with pytest.raises(ValueError, match="views.first_view = 1, this build asks for 0"):
        build_cache(_cfg(data_dir, out, tiny_ckpt, views=1))


def test_changed_settings_refused_on_resume(data_dir, tiny_ckpt, tmp_path, reference_cache):
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    with pytest.raises(ValueError, match="views.seed = 0, this build asks for 1"):
        build_cache(_cfg(data_dir, out, tiny_ckpt, seed=1))


def test_strict_fails_naming_the_file(data_dir, tiny_ckpt, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, _build_args(data_dir, tmp_path / "c", tiny_ckpt, "--strict"))
    assert r.exit_code == 1
    assert "notimage.jpg" in r.output and "--strict" in r.output


def test_dry_run_writes_nothing(data_dir, tiny_ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "c"
    r = runner.invoke(app, _build_args(data_dir, out, tiny_ckpt, "--dry-run"))
    assert r.exit_code == 0, r.output
    assert "bytes/view" in r.output and "views to build" in r.output
    # The projection to ImageNet-1k for this K (2) and codec: bytes/view x 1,281,167 x 2.
    line = " ".join(r.output.split())
    assert "ImageNet-1k (1,281,167 images) at 2 view-epochs, codec int8," in line, line
    assert not out.exists()


def test_refuses_when_disk_is_too_small(data_dir, tiny_ckpt, tmp_path, monkeypatch):
    import tec_cache.build.builder as b

    monkeypatch.setattr(b.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match=r"not enough disk.*1000 B|not enough disk"):
        build_cache(_cfg(data_dir, tmp_path / "c", tiny_ckpt))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.tar"))


def test_tar_source_build(tiny_ckpt, tmp_path):
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    src = tmp_path / "tars"
    src.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(src / "part-000.tar")) as w:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format="JPEG")
            w.write({"__key__": f"img{i}", "jpg": buf.getvalue(), "cls": str(i % 3).encode()})
    out = tmp_path / "cache"
    build_cache(_cfg(src, out, tiny_ckpt, views=1))
    man = load_manifest(out)
    recs = [r for e in man.shards() for r in man.open_shard(e)]
    assert [r.label for r in recs] == [0, 1, 2, 0, 1, 2]
    assert recs[0].image_key == "part-000.tar/img0"


def test_inspect_and_verify(reference_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(reference_cache)])
    assert r.exit_code == 0, r.output
    assert "bytes per view" in r.output and "feat" in r.output and "custom:vit_tiny_patch16_224" in r.output
    r = runner.invoke(app, ["verify", str(reference_cache)])
    assert r.exit_code == 0 and "ok" in r.output
    # Damaged caches: tests/test_faults_inputs.py.


@pytest.mark.slow
def test_views_cut_on_the_device_equal_the_same_recipe_cut_in_workers(data_dir, tiny_ckpt, tmp_path):
    """--view-device device (a GPU build's path: the source's JPEG decode, crop, resize, flip and the
    views' JPEG encode where the base model runs), here on CPU tensors: the same shards, byte for
    byte, as workers cutting with the same resizer; the manifest names the resizer and where views
    were cut; odd sources (PNG, palette, CMYK, unreadable) take the same paths."""
    on_device, in_workers = tmp_path / "device", tmp_path / "workers"
    build_cache(_cfg(data_dir, on_device, tiny_ckpt, view_device="device"))
    build_cache(_cfg(data_dir, in_workers, tiny_ckpt, view_device="workers", resize="torch-bicubic-f32", num_workers=2))
    assert _tree(on_device) == _tree(in_workers)
    man = json.loads((on_device / "manifest.json").read_text())
    assert man["views"]["recipe"]["resize"] == "torch-bicubic-f32"
    assert man["stats"]["build"]["views_cut_on"] == "device"
    assert {s["key"] for s in man["source"]["skipped"]} == BAD
    build_cache(_cfg(data_dir, tmp_path / "default", tiny_ckpt, views=1))
    default = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert default["views"]["recipe"]["resize"] == "torch-bicubic-u8"  # a CPU build's default
    assert default["format"]["compressor"] == "zstd:1"  # a new cache's
    assert default["stats"]["build"]["views_cut_on"] == "workers"


def test_a_resizer_that_cannot_run_where_views_are_cut_is_refused(data_dir, tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="--view-device device: views cut on the device are resized with "
                                         "torch-bicubic-f32, but --resize asks for it: torch-bicubic-u8"):
        build_cache(_cfg(data_dir, tmp_path / "c", tiny_ckpt, view_device="device", resize="torch-bicubic-u8"))
    build_cache(_cfg(data_dir, tmp_path / "u8", tiny_ckpt, views=1))
    with pytest.raises(ValueError, match="the cache at --out .*u8 was resized with it: torch-bicubic-u8"):
        build_cache(_cfg(data_dir, tmp_path / "u8", tiny_ckpt, views=2, view_device="device"))
    assert not (tmp_path / "c").exists()


def test_a_chunk_seals_while_the_next_one_goes_through_the_model(data_dir, tiny_ckpt, tmp_path, reference_cache,
                                                                  monkeypatch):
    """The main thread does not wait for a chunk's last write and its shards' close: the next
    chunk's forward passes run meanwhile (with the default of one batch a shard, that wait was every
    batch's write). The bytes are those of a build that waited."""
    import threading
    import time

    from tec_cache.build import builder as builder_mod

    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    seal, compute = builder_mod._ChunkBuild.seal, builder_mod.Builder._compute

    def slow_seal(self):
        with lock:
            events.append(("seal begins", self.chunk))
        time.sleep(0.5)  # a slow disk
        yield from seal(self)
        with lock:
            events.append(("seal ends", self.chunk))

    def noted_compute(self, chunk, v, n):
        with lock:
            events.append(("forward", chunk.chunk))
        return compute(self, chunk, v, n)

    monkeypatch.setattr(builder_mod._ChunkBuild, "seal", slow_seal)
    monkeypatch.setattr(builder_mod.Builder, "_compute", noted_compute)
    out = tmp_path / "cache"
    build_cache(_cfg(data_dir, out, tiny_ckpt))
    overlapped = [c for c in range(max(c for _, c in events))
                  if events.index(("seal begins", c)) < events.index(("forward", c + 1)) < events.index(("seal ends", c))]
    assert overlapped, events
    assert _tree(out) == _tree(reference_cache)
    assert _manifest_sans_stats(out) == _manifest_sans_stats(reference_cache)


@pytest.mark.parametrize("on_device", [False, True])
def test_a_view_job_crosses_from_a_worker_as_plain_arrays(data_dir, on_device):
    """What a build worker returns holds no tensor: a tensor would cross to the main process as a
    shared-memory file descriptor over a socket of its own, which cost an H200 build's main thread
    up to 29% of its time; arrays cross by value. The main process gets the same pixels as tensors."""
    import numpy as np

    from tec_cache.build import builder as builder_mod
    from tec_cache.core.images import open_source
    from tec_cache.core.views import ViewRecipe

    source = open_source(data_dir)
    jobs = builder_mod._ViewJobs(source, [(0, [0, 1])], seed=0, recipe=ViewRecipe(size=TINY_IMG), on_device=on_device)
    job = jobs[0]
    if on_device:
        assert isinstance(job["source"][1], np.ndarray)
        got = builder_mod._received(job)["source"][1]
        assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), job["source"][1])
    else:
        assert [type(pix) for _, _, pix in job["views"]] == [np.ndarray, np.ndarray]
        got = builder_mod._received(job)["views"]
        assert all(isinstance(pix, torch.Tensor) and np.array_equal(pix.numpy(), arr)
                   for (_, _, pix), (_, _, arr) in zip(got, job["views"]))
