"""Caches read from a URL (tec_cache/format/remote.py): a local HTTP server on 127.0.0.1, started here,
serves the tiny cache; training batches over HTTP equal those from disk, a shard whose bytes change
in transit is refused naming it, dropped connections are retried a bounded number of times and then
fail with a clear error, a read-through folder is filled and reused, and a pipe: command reads too."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tec_cache.build.verify import verify_cache
from tec_cache.format import ShardError
from tec_cache.format.manifest import Manifest, ManifestError, load_manifest
from tec_cache.format.remote import RemoteError
from tec_train.cache_loader import CacheLoader
from tests.faultkit import clean_env, run_module


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits: Counter = Counter()  # path -> GET requests
        self.corrupt: set[str] = set()  # paths whose body gets one byte flipped
        self.drops: Counter = Counter()  # path -> connections still to cut mid-body
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/cache"


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        rel = self.path.removeprefix("/cache/")
        self.server.hits[rel] += 1
        file = self.server.root / rel
        if not self.path.startswith("/cache/") or not file.is_file():
            self.send_error(404)
            return
        body = bytearray(file.read_bytes())
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.drops[rel] > 0:  # the connection drops half way through the body
            self.server.drops[rel] -= 1
            self.wfile.write(bytes(body[: len(body) // 2]))
            self.wfile.flush()
            self.close_connection = True
            return
        if rel in self.server.corrupt:
            body[len(body) // 2] ^= 0x01
        self.wfile.write(bytes(body))


@contextlib.contextmanager
def _serving(root: Path) -> Iterator[_Server]:
    srv = _Server(root)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def server(tiny_cache: SimpleNamespace) -> Iterator[_Server]:
    with _serving(tiny_cache.cache) as srv:
        yield srv


def _batches(cache: str | Path | Manifest, epoch: int, **kw: Any) -> list:
    # A URL too: CacheLoader opens anything load_manifest does.
    with CacheLoader(cache, batch_size=4, num_workers=1, seed=5, **kw) as loader:
        return list(loader.epoch(epoch))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and torch.equal(x.image_index, y.image_index) and x.view_epoch == y.view_epoch
        and x.fields.keys() == y.fields.keys() and all(torch.equal(x.fields[k], y.fields[k]) for k in x.fields)
        for x, y in zip(a, b))


def test_batches_over_http_equal_batches_from_disk(tiny_cache: SimpleNamespace, server: _Server) -> None:
    man = load_manifest(server.url)
    assert man.where == server.url and man.name == "cache"
    assert man.shard_ref(man.shards()[0]).startswith(server.url + "/ve000/")
    for epoch in (0, 1):
        assert _same(_batches(server.url, epoch), _batches(tiny_cache.cache, epoch))
    shards = [e.path for e in man.shards()]
    # Streamed shard by shard as batches needed them, once per epoch's worker, not the whole cache up front.
    assert set(server.hits) == {"manifest.json", *shards}
    assert verify_cache(server.url) == []


@pytest.mark.slow
def test_training_over_http_takes_the_same_steps_as_from_disk(tiny_cache: SimpleNamespace, server: _Server,
                                                              tmp_path: Path) -> None:
    args = ["--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
            "--blr", "1e-3", "--num-workers", "1", "--log-every", "1", "--device", "cpu"]
    runs = {}
    for name, cache in (("disk", str(tiny_cache.cache)), ("http", server.url)):
        r, _ = run_module("tec_train", ["run", "--run-dir", str(tmp_path / name), "--cache", cache, *args], env=clean_env())
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "loss_fea", "loss_att", "lr")
    assert [[rec[k] for k in keys] for rec in runs["http"]] == [[rec[k] for k in keys] for rec in runs["disk"]]
    assert len(runs["http"]) == 10  # 2 epochs of 20 views in batches of 4


def test_inspect_and_show_read_a_cache_over_http(server: _Server, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tec_cache.build.cli import app

    r = CliRunner().invoke(app, ["inspect", server.url])
    assert r.exit_code == 0 and "view-epochs" in r.output and "webdataset" in r.output, r.output
    png = tmp_path / "views.png"
    r = CliRunner().invoke(app, ["show", server.url, "--out", str(png), "--n", "2", "--view-epoch", "1"])
    assert r.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.output
    r = CliRunner().invoke(app, ["inspect", server.url + "/nothing"])
    assert r.exit_code == 2 and "/nothing is not a cache" in r.output, r.output


@pytest.mark.slow
def test_a_shard_changed_in_transit_is_refused_naming_it(server: _Server) -> None:
    man = load_manifest(server.url)
    bad = man.shards(1)[0].path
    server.corrupt.add(bad)
    with pytest.raises(ShardError, match=rf"{server.url}/{bad}: checksum: sha256 [0-9a-f]+, manifest says"):
        _batches(server.url, 1)
    problems = verify_cache(server.url)
    assert [(p.shard, p.check) for p in problems] == [(bad, "shard")]
    r, _ = run_module("tec_cache", ["verify", server.url], env=clean_env())
    said = (r.stdout + r.stderr).replace("\n", "")
    assert r.returncode == 1 and f"BAD {bad}: shard: {server.url}/{bad}: checksum" in said, said


@pytest.mark.slow
def test_dropped_connections_are_retried_then_fail_with_a_clear_error(server: _Server,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEC_FETCH_RETRIES", "2")
    man = load_manifest(server.url)
    entry = man.shards(0)[0]
    server.drops[entry.path] = 2  # two cut connections, then a whole body: the third attempt succeeds
    assert len(man.open_shard(entry)) == entry.num_samples
    assert server.hits[entry.path] == 3
    server.drops[entry.path] = 3  # one more than the retries allow
    with pytest.raises(RemoteError, match=rf"{server.url}/{entry.path}: could not read after 3 attempts "
                                          r"\(TEC_FETCH_RETRIES sets the retries\)"):
        man.open_shard(entry)
    assert server.hits[entry.path] == 6
    hits = sum(server.hits.values())
    with pytest.raises(ManifestError, match=rf"{server.url}/nothing is not a cache: .*not found \(HTTP 404\)"):
        load_manifest(server.url + "/nothing")
    with pytest.raises(ManifestError, match="not a valid URL .*percent-encode spaces"):
        load_manifest(server.url + "/no thing")
    assert sum(server.hits.values()) == hits + 1  # neither a 404 nor a malformed URL is retried


def test_read_through_folder_is_filled_then_read_from(tiny_cache: SimpleNamespace, server: _Server, tmp_path: Path) -> None:
    local = tmp_path / "read-through"
    first = _batches_local(server.url, local)
    shards = [e.path for e in load_manifest(server.url).shards(0)]
    assert all((local / s).is_file() for s in shards)
    before = Counter(server.hits)
    (local / shards[0]).write_bytes(b"damaged copy")  # a bad local copy is fetched again, not trusted
    assert _same(_batches_local(server.url, local), first)
    fetched = {k for k in server.hits if server.hits[k] != before[k]}
    assert fetched == {"manifest.json", shards[0]}
    assert (local / shards[0]).read_bytes() == (tiny_cache.cache / shards[0]).read_bytes()


def _batches_local(url: str, local: Path) -> list:
    return _batches(load_manifest(url, local_dir=local), 0)


@pytest.mark.slow
def test_pipe_command_and_zarr_refusal(tiny_cache: SimpleNamespace, tmp_path: Path) -> None:
    ref = f"pipe:cat {tiny_cache.cache}/{{path}}"
    assert _same(_batches(ref, 0), _batches(tiny_cache.cache, 0))
    with pytest.raises(ManifestError, match="needs {path} where the command takes each file's path"):
        load_manifest(f"pipe:cat {tiny_cache.cache}/manifest.json")
    missing = f"pipe:cat {tmp_path}/nowhere/{{path}}"
    with pytest.raises(ManifestError, match="command exited 1"):
        load_manifest(missing)
    # A zarr cache's shards are folder trees: refused with what to do instead.
    zarr_cache = tmp_path / "zarr"
    shutil.copytree(tiny_cache.cache, zarr_cache)
    raw = json.loads((zarr_cache / "manifest.json").read_text())
    raw["format"]["name"] = "zarr"
    (zarr_cache / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="a zarr cache cannot be streamed .* --format webdataset"):
        load_manifest(f"pipe:cat {zarr_cache}/{{path}}")


@pytest.mark.slow
def test_build_from_tar_urls_equals_the_build_from_the_same_tars_on_disk(tiny_ckpt: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from tec_cache.build.builder import BuildConfig, build_cache
    from tests.conftest import tiny_spec

    tars = tmp_path / "tars"
    tars.mkdir()
    rng = np.random.default_rng(0)
    for t in range(2):
        with wds.TarWriter(str(tars / f"train-{t:03d}.tar")) as w:
            for i in range(4):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format="JPEG")
                w.write({"__key__": f"img{t}{i}", "jpg": buf.getvalue(), "cls": str(i % 2).encode()})
    monkeypatch.setenv("TEC_DATA_CACHE", str(tmp_path / "data-cache"))

    def build(data: str | Path, out: Path) -> None:
        build_cache(BuildConfig(data=data, out=out, checkpoint=tiny_ckpt, spec=tiny_spec(), views=1, shard_size=4,
                                batch_size=4, num_workers=0, device="cpu"))

    with _serving(tars) as srv:
        srv.drops["train-001.tar"] = 1  # a dropped download is retried
        url = f"{srv.url}/train-{{000..001}}.tar"
        build(url, tmp_path / "from-url")
        assert srv.hits == Counter({"train-000.tar": 1, "train-001.tar": 2})
        build(url, tmp_path / "from-url-again")  # the downloaded tars are reused
        assert srv.hits == Counter({"train-000.tar": 1, "train-001.tar": 2})
    build(tars, tmp_path / "from-disk")
    for name in ("ve000/shard-000000.tar", "ve000/shard-000001.tar"):
        assert (tmp_path / "from-url" / name).read_bytes() == (tmp_path / "from-disk" / name).read_bytes()
    assert load_manifest(tmp_path / "from-url").source.path == url
