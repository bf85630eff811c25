"""Views are pure functions of (seed, key, view); sources convert every mode and name bad files."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tec_cache.core.images import BadImage, decode_image, open_source
from tec_cache.core.views import DeviceViews, ViewRecipe, cut_view, decode_view, load_source, make_views, view_params, view_rng
from tests.conftest import add_skimage_photos, make_image_folder


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((300, 200))


def test_views_are_pure_functions_of_seed_key_view():
    img, r = _photo(), ViewRecipe(size=64)
    a = make_views(img, "cls/a.jpg", [0, 1, 2], seed=7, recipe=r)
    b = make_views(img, "cls/a.jpg", [2, 0], seed=7, recipe=r)  # other order, subset
    assert a[0][1] == b[1][1] and a[2][1] == b[0][1]
    assert len({v[1] for v in a}) == 3  # different view indices differ
    assert make_views(img, "cls/b.jpg", [0], 7, r)[0][1] != a[0][1]
    assert make_views(img, "cls/a.jpg", [0], 8, r)[0][1] != a[0][1]


def test_stored_jpeg_decodes_to_the_pixels_the_base_model_saw():
    (v, data, pix), = make_views(_photo(), "k", [0], 0, ViewRecipe(size=48))
    assert pix.dtype == torch.uint8 and pix.shape == (3, 48, 48)
    assert torch.equal(decode_view(data), pix)


def test_crop_sampling_follows_random_resized_crop():
    """Same sampling law as torchvision's RandomResizedCrop.get_params: boxes inside the image,
    the same area and ratio distribution (compared with torchvision's own sampler), about half
    flipped, and the centre-crop fallback."""
    recipe = ViewRecipe()
    ours, flips = [], 0
    for i in range(2000):
        p = view_params(500, 375, view_rng(0, f"img{i}", 0), recipe)
        assert 0 <= p.top and p.top + p.height <= 375 and 0 <= p.left and p.left + p.width <= 500
        ours.append((p.height * p.width / (500 * 375), p.width / p.height))
        flips += p.flip
    torch.manual_seed(0)
    img = Image.new("RGB", (500, 375))
    ref = []
    for _ in range(2000):
        _top, _left, h, w = T.RandomResizedCrop.get_params(img, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
        ref.append((h * w / (500 * 375), w / h))
    ours_a, ref_a = np.array(ours), np.array(ref)
    assert ours_a[:, 0].min() >= 0.19 and ours_a[:, 1].min() >= 0.74 and ours_a[:, 1].max() <= 1.34
    assert np.abs(ours_a.mean(0) - ref_a.mean(0)).max() < 0.02
    assert np.abs(ours_a.std(0) - ref_a.std(0)).max() < 0.02
    assert 900 < flips < 1100
    # A sliver image makes every try fail: torchvision's centre-crop fallback.
    p = view_params(1000, 10, view_rng(0, "sliver", 0), recipe)
    assert (p.height, p.width, p.top) == (10, int(round(10 * 4 / 3)), 0)


def _torchvision_cut(img: Image.Image, p, size: int) -> torch.Tensor:
    ref = T.functional.resized_crop(img, p.top, p.left, p.height, p.width, [size, size], interpolation=T.InterpolationMode.BICUBIC)
    return T.functional.pil_to_tensor(T.functional.hflip(ref) if p.flip else ref)


def test_legacy_resizer_is_torchvisions_pil_bicubic_exactly():
    img = _photo()
    r = ViewRecipe(size=56, resize="pil-bicubic")
    p = view_params(img.width, img.height, view_rng(1, "x", 3), r)
    assert torch.equal(cut_view(img, p, r), _torchvision_cut(img, p, 56))


@pytest.mark.parametrize("resize", ["torch-bicubic-u8", "torch-bicubic-f32"])
def test_torch_resizers_match_pils_bicubic_but_for_rounding(resize):
    """Over real photos, strong downscales and upscales, flipped or not: downscaled, at most one
    grey level from PIL's bicubic; upscaled, a few percent of the pixels one level off and fewer
    than 1 in 10,000 more (overshoot at hard edges, where PIL's fixed point rounds otherwise).
    The same pixels from a PIL image or a tensor, channels-last or not."""
    from skimage import data

    differing, far, total = 0, 0, 0
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        src = T.functional.pil_to_tensor(img)
        for v in range(6):
            size = (32, 224)[v % 2]  # strong downscale and upscale
            r = ViewRecipe(size=size, resize=resize)
            p = view_params(img.width, img.height, view_rng(0, name, v), r)
            got = cut_view(src, p, r)
            assert got.dtype == torch.uint8 and got.shape == (3, size, size) and got.is_contiguous()
            assert torch.equal(got, cut_view(img, p, r))
            assert torch.equal(got, cut_view(src.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0], p, r))
            d = (got.int() - _torchvision_cut(img, p, size).int()).abs()
            if size == 32:
                assert d.max() <= 1, (name, v, d.max())
            differing += int((d > 0).sum())
            far += int((d > 1).sum())
            total += d.numel()
    assert differing / total < 0.08 and far / total < 1e-4


def test_jpeg_sources_decode_as_pil_does_for_the_torch_resizers():
    from skimage import data

    img = Image.fromarray(data.chelsea())
    for mode, progressive in (("RGB", False), ("L", True), ("CMYK", False)):
        buf = io.BytesIO()
        img.convert(mode).save(buf, "JPEG", quality=85, progressive=progressive)
        got = load_source(buf.getvalue(), "x.jpg", ViewRecipe())
        assert torch.equal(got, T.functional.pil_to_tensor(decode_image(buf.getvalue(), "x.jpg"))), mode
    png = io.BytesIO()
    img.convert("P").save(png, "PNG")
    assert torch.equal(load_source(png.getvalue(), "x.png", ViewRecipe()),
                       T.functional.pil_to_tensor(decode_image(png.getvalue(), "x.png")))
    with pytest.raises(BadImage, match="x.jpg: not a recognised image format"):
        load_source(b"garbage" * 20, "x.jpg", ViewRecipe())


def test_an_unknown_resizer_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="resize: unknown resizer 'lanczos'.*pil-bicubic"):
        ViewRecipe(resize="lanczos")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(mode):
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode != "I;16" else Image.fromarray(arr[..., 0].astype(np.uint16) * 256)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    out = decode_image(buf.getvalue(), "x")
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        assert np.asarray(out)[..., 0].max() > 128  # scaled down to 8 bits, not clipped to 255


def test_bad_files_name_themselves(tmp_path):
    with pytest.raises(BadImage, match="f.jpg: empty"):
        decode_image(b"", "f.jpg")
    with pytest.raises(BadImage, match="g.jpg: not a recognised image format"):
        decode_image(b"garbage" * 20, "g.jpg")


def test_decompression_bomb_refused():
    buf = io.BytesIO()
    Image.new("L", (20000, 10000)).save(buf, format="PNG")  # 200 MP of zeros compresses to ~200 KB
    with pytest.raises(BadImage, match="bomb.png:.*exceeds"):
        decode_image(buf.getvalue(), "bomb.png")


def test_folder_source_sorted_with_labels(tmp_path):
    root = make_image_folder(tmp_path / "d", n_per_class=2)
    add_skimage_photos(root)
    src = open_source(root)
    keys = [it.key for it in src.items]
    assert keys == sorted(keys)
    assert src.classes == ["class0", "class1", "photos"]
    assert {it.label for it in src.items if it.key.startswith("class1/")} == {1}
    photo = src.items[keys.index("photos/camera.png")]
    assert decode_image(src.read_bytes(keys.index(photo.key)), photo.key).mode == "RGB"


def test_tar_source(tmp_path):
    import webdataset as wds

    arr = np.zeros((16, 16, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"src-{shard}.tar")) as w:
            for i in range(3):
                w.write({"__key__": f"s{shard}_{i}", "jpg": buf.getvalue(), "cls": str(i % 2).encode()})
    src = open_source(tmp_path)
    assert src.kind == "webdataset" and len(src) == 6
    assert [it.label for it in src.items] == [0, 1, 0, 0, 1, 0]
    assert decode_image(src.read_bytes(4), "x").size == (16, 16)


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_source(tmp_path / "empty")


class _FakeDeviceDecoder(DeviceViews):
    """A device whose JPEG decoder is simulated on the CPU: exact, or one grey level off from the
    ``off_from``-th view on (as a GPU decoder that rounds otherwise would be)."""

    def __init__(self, off_from: int | None) -> None:
        super().__init__(torch.device("cpu"), ViewRecipe(size=48, resize="torch-bicubic-f32"), threads=2)
        self.decoded_on, self.off_from, self.seen = "device", off_from, 0

    def device_decode(self, datas):
        out = []
        for d in datas:
            pix = decode_view(d)
            if self.off_from is not None and self.seen >= self.off_from:
                pix = pix ^ 1  # flips the lowest bit: one grey level
            out.append(pix)
            self.seen += 1
        return out


@pytest.mark.parametrize("off_from", [None, 6])
def test_device_views_are_the_stored_bytes_pixels_as_the_cpu_decodes_them(off_from):
    """Views cut by DeviceViews decode (CPU, as stage 2 does) to exactly the pixels handed to the base
    model: a device decoder that agrees is trusted after the check, one that does not is dropped at
    its first difference and the CPU decodes from then on."""
    from tec_cache.core import views as views_mod

    dv = _FakeDeviceDecoder(off_from)
    src = T.functional.pil_to_tensor(_photo())
    n = 0
    for i in range(0, 40, 4):
        for _v, data, pix in dv.make(src, f"img{i}", [0, 1, 2, 3], seed=0):
            assert torch.equal(pix, decode_view(data))
            n += 1
    dv.close()
    if off_from is None:
        assert dv.decoded_on == "device" and dv.checked == n  # fewer than DECODER_CHECK_VIEWS: still checking
        assert n < views_mod.DECODER_CHECK_VIEWS
    else:
        assert dv.decoded_on == "cpu" and dv.checked == 4  # the first batch agreed, the second did not
