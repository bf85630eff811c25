"""scripts/miniature.py, the README's main job, end to end on a few hundred Fashion-MNIST images:
every stage through the real commands, two seeds, the results table with the claims checked, the
pictures, resuming without redoing work, and the message when the dataset is missing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tec_cache.core.fashion_mnist import DEFAULT_DIR, HOW_TO_GET

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "miniature.py"


def _preset(tmp_path: Path) -> Path:
    """fmnist-quick made smaller: a delta on the tree's preset, as a user would write one."""
    path = tmp_path / "fmnist-tiny-test.toml"
    path.write_text(f"""extends = "{ROOT / 'pipelines' / 'fmnist-quick.toml'}"
name = "fmnist-tiny-test"
[data]
train_images = 160
test_images = 100
[base]
epochs = 1
batch_size = 32
[cache]
cache_name = "fmnist-tiny-test"
[pretrain]
batch_size = 32
[eval]
epochs = 2
""")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_DIR / "train-labels-idx1-ubyte.gz").is_file(), reason="needs Debian's dataset-fashion-mnist")
def test_miniature_pipeline_two_seeds_table_pictures_and_resume(tmp_path: Path) -> None:
    preset = _preset(tmp_path)
    out = tmp_path / "out"
    r = _run("--pipeline", str(preset), "--seeds", "0", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = out / "fmnist-tiny-test"
    res = json.loads((root / "results.json").read_text())
    assert set(res["seeds"]) == {"0", "1"}
    for seed in ("0", "1"):
        ev = res["seeds"][seed]["eval"]
        assert set(ev) == {"base", "tec_cache", "tec_online", "mae_more"}
        assert all(0.0 <= e["knn_top1"] <= 1.0 and 0.0 <= e["linear_top1"] <= 1.0 for e in ev.values())
        assert res["seeds"][seed]["cache_bytes"] > 0
        assert set(res["seeds"][seed]["times"]) >= {"base", "cache_build", "tec_cache", "tec_online", "mae_more", "evaluation"}
    # Two seeds give different models (the seed reaches the base model, the views and the students).
    assert res["seeds"]["0"]["eval"]["base"] != res["seeds"]["1"]["eval"]["base"]
    assert len(res["claims"]) == 6 and all(isinstance(c["holds"], bool) for c in res["claims"])
    table = (root / "results.md").read_text()
    for row in ("A_base", "A_tec_cache", "A_tec_online", "A_mae_more", "raw pixels", "random init", "Cache:"):
        assert row in table
    for picture in ("views.png", "curves.png"):
        assert (root / "seed-0" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "seed-0" / "export" / "model.safetensors").is_file()
    # The base run's checkpoint carries the seed given on the command line.
    config = json.loads((root / "seed-1" / "base" / "config.json").read_text())
    assert config["options"]["seed"] == 1 and config["options"]["objective"] == "mae"

    # A re-run finds everything done: no stage runs again and the table is the same.
    before = (root / "seed-0" / "state.json").read_text()
    r = _run("--pipeline", str(preset), "--seeds", "0", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seed 0: done before" in r.stdout and "seed 1: done before" in r.stdout
    assert (root / "seed-0" / "state.json").read_text() == before
    assert (root / "results.md").read_text() == table


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In process (the script's main), so the fast tier pays no interpreter start-up for a message.
    import runpy

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--pipeline", "fmnist-quick", "--seeds", "0", "--out",
                                      str(tmp_path / "o"), "--fashion-mnist", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert HOW_TO_GET in " ".join(str(e.value.code).split())
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt"))


def _study_preset(tmp_path: Path) -> Path:
    """fmnist-views made tiny: 2 view-epochs, students of 8 epochs, a 1-epoch fine-tune."""
    path = tmp_path / "fmnist-views-test.toml"
    path.write_text(f"""extends = "{ROOT / 'pipelines' / 'fmnist-views.toml'}"
name = "fmnist-views-test"
[data]
train_images = 96
test_images = 64
[base]
epochs = 1
batch_size = 32
[cache]
cache_name = "fmnist-views-test"
views = 2
[pretrain]
batch_size = 32
epochs = 8
warmup_epochs = 1
val_every = 10
[finetune]
epochs = 1
warmup_epochs = 0
batch_size = 32
train_subset = 96
val_subset = 64
[eval]
epochs = 2
""")
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_DIR / "train-labels-idx1-ubyte.gz").is_file(), reason="needs Debian's dataset-fashion-mnist")
def test_views_study_trains_every_model_and_reports(tmp_path: Path) -> None:
    """scripts/views_study.py end to end at a tiny size: students at K = 1 and 2 of a 2-view cache,
    online and int8-coarse, each with its held-out loss, every model probed and fine-tuned."""
    preset = _study_preset(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "views_study.py"), "--pipeline", str(preset), "--ks", "1", "2",
                        "--seeds", "0", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = out / "fmnist-views-test"
    res = json.loads((root / "results.json").read_text())
    ev = res["seeds"]["0"]["eval"]
    assert set(ev) == {"base", "tec_k1", "tec_k2", "tec_online", "tec_k2_coarse", "mae_more"}
    for name, e in ev.items():
        assert 0.0 <= e["knn_top1"] <= 1.0 and 0.0 <= e["linear_top1"] <= 1.0 and 0.0 <= e["finetune_top1"] <= 1.0
        assert ("val_loss_fea" in e) == name.startswith("tec_"), name  # the students log the held-out loss
    # The K = 1 student read view-epoch 0 only; the coarse cache is smaller than the int8 one.
    assert json.loads((root / "seed-0" / "tec_k1" / "config.json").read_text())["options"]["view_epochs"] == 1
    assert res["seeds"]["0"]["cache_bytes"]["int8-coarse"] < res["seeds"]["0"]["cache_bytes"]["int8"]
    assert (root / "seed-0" / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "heldout-vs-epoch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "results.md").read_text()
    assert "| tec_k1 |" in md and "| reference: random init |" in md
    # Every question is answered from the numbers; with one seed there is no spread to test "within noise" against.
    assert "| K = 1 within seed noise of online: held-out loss_fea | not tested (one seed) |" in md
    assert "1 seed, no spread" in md and "| yes |" not in md.split("| K = 1 within seed noise")[1].split("\n")[0]
    assert "| base beats an untrained encoder: kNN |" in md


def test_views_study_refuses_too_few_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    preset = _study_preset(tmp_path)
    monkeypatch.setattr(sys, "argv", ["views_study.py", "--pipeline", str(preset), "--ks", "1", "4", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "scripts" / "views_study.py"), run_name="__main__")
    assert "at least 4 x K_max = 16" in str(e.value.code)
    assert not (tmp_path / "o").exists()  # refused before any work


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_results(models: list[str], seeds: list[int], metrics: tuple[str, ...], base: float = 0.60) -> dict:
    """Per-seed evaluations whose numbers differ by model and seed (tec_* above base by 2 points, seed s
    adding s/10 of a point), for the claim checks alone."""
    ev = {str(s): {"eval": {m: {k: base + (0.02 if m.startswith("tec") else 0.0) + (0.0015 if m == "tec_online" else 0.0)
                                + s / 1000 for k in metrics} for m in models}} for s in seeds}
    return {"seeds": ev, "random_init": {"knn_top1": 0.3, "linear_top1": 0.3}}


def test_miniature_claims_with_one_seed_are_not_tested_never_holding() -> None:
    mini = _script("miniature")
    one = mini.claims(_fake_results(list(mini.MODELS), [0], ("knn_top1", "linear_top1")), [0])
    noise = [c for c in one if "seed spread" in c[0]]
    assert len(one) == 6 and len(noise) == 2
    # The case: the online and cached students 0.15 points apart, "spread" 0.00 with one seed.
    for claim, ok, numbers in noise:
        assert ok is None and mini.verdict_text(ok) == "not tested (one seed)", claim
        assert numbers == "0.15 vs spread 0.00 (1 seed, no spread)"
        assert "holds" not in mini.verdict_line(ok)
    assert all("(1 seed, no spread)" in numbers for _, _, numbers in one)  # every line states its denominator
    assert [ok for c, ok, _ in one if "seed spread" not in c] == [True, True, True, True]

    two = mini.claims(_fake_results(list(mini.MODELS), [0, 1], ("knn_top1", "linear_top1")), [0, 1])
    for claim, ok, numbers in two:
        assert isinstance(ok, bool) and numbers.endswith("(means of 2 seeds, seed spread 0.10)"), (claim, numbers)
    # 0.15 apart against a spread of 0.10 over two seeds: tested, and it does not hold.
    assert [ok for c, ok, _ in two if "seed spread" in c] == [False, False]
    assert mini.verdict_text(False, markdown=True) == "**no**" and mini.verdict_text(True) == "yes"


def test_views_study_answers_state_their_seeds_and_test_noise_only_with_two() -> None:
    study = _script("views_study")
    ks = [1, 2]
    models = ["base", "mae_more", "tec_k1", "tec_k2", "tec_online", "tec_k2_coarse"]
    metrics = ("knn_top1", "linear_top1", "finetune_top1", "val_loss_fea", "val_loss_att")
    one = study.answers(_fake_results(models, [0], metrics), [0], ks)
    noise = [a for a in one if "within seed noise" in a[0]]
    assert noise and all(ok is None for _, ok, _ in noise)
    assert all(numbers.endswith("(1 seed, no spread)") for _, _, numbers in one)
    two = study.answers(_fake_results(models, [0, 1], metrics), [0, 1], ks)
    assert all(isinstance(ok, bool) for _, ok, _ in two)
    assert all("(means of 2 seeds, seed spread " in numbers for _, _, numbers in two)
