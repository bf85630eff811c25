"""Base-model weights by URL and by name, against a server on 127.0.0.1 that each test starts and
stops: fetched, verified, cached, reused offline, resumed after a cut connection; wrong hashes, offline
misses and the registry's official names (and a mirror serving another file under one) refused."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tec_cache.build.config import build_config
from tec_cache.core import weights as w
from tec_cache.core.basemodels import OFFICIAL_WEIGHTS, load_base_model, official_weights, resolve_weights
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK, make_image_folder, tiny_spec, tiny_state_dict


class _Server:
    """Files by path; ``cut_after`` drops the first response of a path after that many bytes;
    Range requests are honoured (206); every request's path and Range header is logged."""

    def __init__(self, files: dict[str, bytes], cut_after: int | None = None, honour_range: bool = True) -> None:
        self.files, self.cut_after, self.honour_range = files, cut_after, honour_range
        self.log: list[tuple[str, str | None]] = []
        self.cut_done: set[str] = set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                outer.log.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and outer.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if outer.cut_after is not None and self.path not in outer.cut_done:
                    outer.cut_done.add(self.path)
                    self.wfile.write(part[:outer.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _url(name: str) -> str:
    """The official download URL of a registry base that has one."""
    url = OFFICIAL_WEIGHTS[name].url
    assert url is not None, name
    return url


@pytest.fixture()
def serve() -> Iterator:
    servers: list[_Server] = []

    def start(files: dict[str, bytes], cut_after: int | None = None, honour_range: bool = True) -> _Server:
        s = _Server(files, cut_after, honour_range)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "tec-home"
    monkeypatch.setenv("TEC_HOME", str(home))
    for var in ("TEC_OFFLINE", "HF_HUB_OFFLINE", "TEC_WEIGHTS_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TEC_FETCH_RETRIES", "2")
    return home


@functools.cache
def _ckpt_bytes(layout: str, seed: int = 0) -> bytes:
    sd = tiny_state_dict(seed)
    obj = {"model": sd} if layout == "mae" else {"state_dict": sd}  # MAE's release, iBOT's teacher
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("layout", ["mae", "ibot"])
def test_fetched_verified_cached_and_reused_with_the_server_stopped(serve, layout: str, _home: Path) -> None:
    body = _ckpt_bytes(layout)
    srv = serve({"/ibot/vitb_16/checkpoint_teacher.pth": body})
    url = srv.base + "/ibot/vitb_16/checkpoint_teacher.pth"
    path, facts = w.resolve_checkpoint(url, _sha(body))
    # Keyed by the URL (host and path), not the bare file name every iBOT size shares.
    assert path == _home / "weights" / f"127.0.0.1_{url.split(':')[2].split('/')[0]}" / "ibot" / "vitb_16" / "checkpoint_teacher.pth"
    assert path.read_bytes() == body and facts == {"url": url, "size": len(body)}
    assert not list(path.parent.glob("*.part"))
    model, load = load_base_model(tiny_spec(), path, fetched=facts)
    assert load["sha256"] == _sha(body) and load["url"] == url and load["layout"].startswith(layout)
    assert torch.equal(model.state_dict()["pos_embed"], tiny_state_dict(0)["pos_embed"])
    srv.stop()
    again, _ = w.resolve_checkpoint(url, _sha(body))  # no server: the verified copy
    assert again == path and len(srv.log) == 1


def test_a_reused_file_is_hashed_again(serve) -> None:
    body = _ckpt_bytes("mae")
    srv = serve({"/m.pth": body})
    got = w.fetch_weights(srv.base + "/m.pth")
    data = bytearray(got.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another byte: only the hash can tell
    got.path.write_bytes(bytes(data))
    with pytest.raises(w.WeightsError, match=rf"sha256: expected {got.sha256}"):
        w.fetch_weights(srv.base + "/m.pth")
    got.path.write_bytes(bytes(data[:-1]))
    with pytest.raises(w.WeightsError, match="bytes"):
        w.fetch_weights(srv.base + "/m.pth")


def test_wrong_hash_refused_naming_expected_and_actual(serve) -> None:
    body = _ckpt_bytes("mae")
    srv = serve({"/m.pth": body})
    wrong = "0" * 64
    with pytest.raises(w.WeightsError, match=rf"sha256: expected {wrong}, got {_sha(body)}"):
        w.resolve_checkpoint(srv.base + "/m.pth", wrong)
    path = w.cache_path(srv.base + "/m.pth")
    assert not path.exists() and not path.with_name(path.name + ".part").exists()  # nothing wrong is kept
    with pytest.raises(w.WeightsError, match="64 hex digits"):
        w.resolve_checkpoint(srv.base + "/m.pth", "abc")


def test_connection_cut_mid_file_is_resumed_with_a_range_request(serve) -> None:
    body = _ckpt_bytes("ibot")
    srv = serve({"/t.pth": body}, cut_after=1000)
    got = w.fetch_weights(srv.base + "/t.pth", w.Expected(sha256=_sha(body)))
    assert got.path.read_bytes() == body
    assert srv.log == [("/t.pth", None), ("/t.pth", "bytes=1000-")]


def test_a_server_ignoring_range_restarts_the_file(serve) -> None:
    body = _ckpt_bytes("ibot")
    srv = serve({"/t.pth": body}, cut_after=1000, honour_range=False)
    got = w.fetch_weights(srv.base + "/t.pth", w.Expected(sha256=_sha(body)))
    assert got.path.read_bytes() == body and len(srv.log) == 2


def test_retries_are_bounded(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = serve({})
    srv.stop()  # nothing listens there any more: every attempt fails to connect
    with pytest.raises(w.WeightsError, match=r"after 3 attempts"):
        w.fetch_weights(srv.base + "/gone.pth")


def test_offline_miss_names_the_url_and_the_path_to_stage_at(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _ckpt_bytes("mae")
    srv = serve({"/m.pth": body})
    url = srv.base + "/m.pth"
    for var in ("TEC_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(w.WeightsError) as e:
            w.resolve_checkpoint(url)
        assert url in str(e.value) and str(w.cache_path(url)) in str(e.value)
        monkeypatch.delenv(var)
    assert srv.log == []
    # Staged by hand at that path: verified against the expected hash, then used offline.
    monkeypatch.setenv("TEC_OFFLINE", "1")
    w.cache_path(url).parent.mkdir(parents=True, exist_ok=True)
    w.cache_path(url).write_bytes(body)
    with pytest.raises(w.WeightsError, match="expected " + "1" * 64):
        w.resolve_checkpoint(url, "1" * 64)
    path, _ = w.resolve_checkpoint(url, _sha(body))
    assert path == w.cache_path(url) and srv.log == []


def test_official_names_state_their_urls_and_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    mae_b, mae_l, ibot = OFFICIAL_WEIGHTS["mae1kbase"], OFFICIAL_WEIGHTS["mae1klarge"], OFFICIAL_WEIGHTS["ibot1kbase"]
    assert mae_b.url == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
    assert mae_l.url == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"
    assert (mae_b.md5_prefix, mae_l.md5_prefix) == ("8cad7c", "b8b06e")
    assert ibot.url == ("https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/"
                        "checkpoint_teacher.pth")
    # Cached under the URL: the iBOT file keeps its size folder.
    assert w.cache_path(ibot.url).parts[-3:] == ("ibot", "vitb_16", "checkpoint_teacher.pth")
    monkeypatch.setenv("TEC_OFFLINE", "1")
    with pytest.raises(w.WeightsError) as e:
        official_weights("mae1kbase")
    assert mae_b.url in str(e.value) and str(w.cache_path(mae_b.url)) in str(e.value) and "8cad7c" in str(e.value)
    with pytest.raises(w.WeightsError, match="never released.*--checkpoint"):
        official_weights("mae1k300ep")


def test_mirror_serving_another_file_under_an_official_name_is_refused(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _ckpt_bytes("mae")
    assert not hashlib.md5(body).hexdigest().startswith("8cad7c")
    srv = serve({"/mirror/mae_pretrain_vit_base.pth": body, "/mirror/vitb_16/checkpoint_teacher.pth": body})
    monkeypatch.setenv("TEC_WEIGHTS_MIRROR", srv.base + "/mirror/")
    with pytest.raises(w.WeightsError, match=r"md5: expected a digest starting 8cad7c, got "):
        official_weights("mae1kbase")
    assert srv.log[0][0] == "/mirror/mae_pretrain_vit_base.pth"
    assert not w.cache_path(_url("mae1kbase")).exists()
    # Pinned by --checkpoint-sha256, the iBOT name (no published hash) takes only those bytes.
    with pytest.raises(w.WeightsError, match="sha256: expected " + "2" * 64):
        official_weights("ibot1kbase", "2" * 64)
    path, facts = official_weights("ibot1kbase", _sha(body))
    assert facts["url"] == OFFICIAL_WEIGHTS["ibot1kbase"].url
    assert facts["fetched_from"] == srv.base + "/mirror/vitb_16/checkpoint_teacher.pth"
    assert path == w.cache_path(_url("ibot1kbase"))


def test_build_takes_a_checkpoint_url_and_records_it(serve, tmp_path: Path) -> None:
    body = _ckpt_bytes("mae")
    srv = serve({"/w/tiny.pth": body})
    data = make_image_folder(tmp_path / "data", n_per_class=2, bad=False)
    flags = dict(data=str(data), out=tmp_path / "cache", checkpoint=srv.base + "/w/tiny.pth",
                 checkpoint_sha256=_sha(body), arch=TINY_ARCH, img_size=TINY_IMG, patch_size=TINY_PATCH, topk=TINY_TOPK)
    cfg = build_config(flags)
    assert cfg.fetched is not None
    assert cfg.checkpoint == w.cache_path(srv.base + "/w/tiny.pth") and cfg.fetched["url"] == srv.base + "/w/tiny.pth"
    from tec_cache.build.builder import build_cache
    from tec_cache.format.manifest import load_manifest

    cfg.num_workers, cfg.device, cfg.batch_size = 0, "cpu", 8
    build_cache(cfg)
    bm = load_manifest(tmp_path / "cache").base_model
    assert bm.sha256 == _sha(body) and bm.extra["url"] == srv.base + "/w/tiny.pth" and bm.extra["size"] == len(body)
    assert bm.extra["input_mean"] == [0.485, 0.456, 0.406] and bm.extra["num_prefix_tokens"] == 1
    # --arch without any weights is refused naming the option.
    with pytest.raises(ValueError, match="--checkpoint is required"):
        build_config({**flags, "checkpoint": None, "checkpoint_sha256": None, "out": tmp_path / "c2"})


def test_a_registry_name_with_no_checkpoint_fetches_its_official_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEC_OFFLINE", "1")
    spec = tiny_spec()
    with pytest.raises(w.WeightsError, match="--checkpoint is required for --arch"):
        resolve_weights(spec, None)
    from tec_cache.core.basemodels import resolve_spec

    with pytest.raises(w.WeightsError, match=r"mae_pretrain_vit_large\.pth"):
        resolve_weights(resolve_spec("mae1klarge"), None)


def test_headline_command_offline_names_the_url_and_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tec-cache build --basemodel ibot1kbase` needs no --checkpoint: offline and not yet fetched, it
    exits 2 saying where the file comes from and where to stage it."""
    from typer.testing import CliRunner

    from tec_cache.build.cli import app

    monkeypatch.setenv("TEC_OFFLINE", "1")
    data = make_image_folder(tmp_path / "data", n_per_class=2, bad=False)
    r = CliRunner().invoke(app, ["build", "--basemodel", "ibot1kbase", "--data", str(data), "--out", str(tmp_path / "c")])
    text = "".join(r.output.split())  # the console wraps long lines
    assert r.exit_code == 2, r.output
    url = _url("ibot1kbase")
    assert "".join(url.split()) in text and "".join(str(w.cache_path(url)).split()) in text
    assert not (tmp_path / "c").exists()
    r = CliRunner().invoke(app, ["build", "--basemodel", "mae1k300ep", "--data", str(data), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "neverreleased" in "".join(r.output.split())


def test_downstream_takes_a_weights_url_or_a_registry_name_alone(serve, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tec_train.cli import app
    from tec_train.encoder_weights import load_encoder
    from tec_train.eval_config import EvalConfig
    from tec_train.finetune_config import EncoderSource

    body = _ckpt_bytes("ibot")
    srv = serve({"/tiny.pth": body})
    vit, facts = load_encoder(srv.base + "/tiny.pth", arch=TINY_ARCH, patch_size=TINY_PATCH)
    assert facts["kind"] == "basemodel" and facts["sha256"] == _sha(body) and facts["url"] == srv.base + "/tiny.pth"
    assert torch.equal(vit.state_dict()["pos_embed"], tiny_state_dict(0)["pos_embed"])
    EvalConfig(basemodel="mae1kbase").validate()  # no SOURCE: the official file
    EncoderSource(basemodel="ibot1kbase").validate()
    with pytest.raises(ValueError, match="SOURCE"):
        EvalConfig().validate()
    monkeypatch.setenv("TEC_OFFLINE", "1")
    r = CliRunner().invoke(app, ["knn", "--basemodel", "mae1kbase", "--fashion-mnist"])
    assert r.exit_code == 2 and "mae_pretrain_vit_base.pth" in "".join(r.output.split()), r.output


def test_progress_bar_shows_the_file_and_its_size(serve, capsys: pytest.CaptureFixture[str]) -> None:
    body = _ckpt_bytes("mae")
    srv = serve({"/bar.pth": body})
    w.fetch_weights(srv.base + "/bar.pth", progress=True)
    err = " ".join(capsys.readouterr().err.split())
    mb = f"{len(body) / 1e6:.1f}"
    assert "fetching bar.pth" in err and f"{mb}/{mb} MB" in err and re.search(r"[\d.]+ [kMG]?B/s", err)  # size, rate


def test_a_partial_file_that_cannot_be_resumed_is_started_over(serve) -> None:
    body = _ckpt_bytes("mae")
    srv = serve({"/p.pth": body})
    part = w.cache_path(srv.base + "/p.pth").with_name("p.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (len(body) + 10))  # longer than the file: left by something else
    got = w.fetch_weights(srv.base + "/p.pth", w.Expected(sha256=_sha(body)))
    assert got.path.read_bytes() == body and srv.log == [("/p.pth", f"bytes={len(body) + 10}-"), ("/p.pth", None)]
