"""The paper's claim in miniature, on real images: does a TEC student trained from a cache of an MAE
base model beat that base model, and MAE trained on for the same extra epochs?

Data flow, per seed, all through the project's own commands (``--pipeline`` presets):
    Fashion-MNIST subset --> tec-train run --objective mae           (A_base: the base model)
                         --> tec-cache build + verify                (the base model's targets, cached)
                         --> tec-train run --cache                   (A_tec_cache)
                         --> tec-train run online (same base)        (A_tec_online)
                         --> tec-train run --objective mae --init-from base, same extra epochs (A_mae_more)
    every model --> frozen features --> kNN (k=20, cosine, T=0.07) and a linear probe on the test split.

    python scripts/miniature.py [--pipeline fmnist-mini] [--seeds 0 1] [--out runs/miniature]

Re-running resumes: finished stages are skipped (their times are kept in state.json), an
interrupted training run resumes from its last checkpoint. The results table goes to stdout,
results.md and results.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from rich.table import Table
from torch.utils.data import Subset

from tec_cache.core.fashion_mnist import DEFAULT_DIR, HOW_TO_GET, export_image_folder, subset_indices
from tec_cache.runtime.config import check_fields, resolve
from tec_cache.runtime.pipelines import load_pipeline
from tec_cache.runtime.plain_log import log_console
from tec_train.encoder_weights import load_encoder
from tec_train.eval_config import DataSubsets, EvalConfig
from tec_train.evaluate import extract_features, knn_classify, linear_probe
from tec_train.harness.checkpoints import latest_checkpoint
from tec_train.labelled import FashionMNIST
from tec_train.mae import build_mae
from tec_train.pipeline_tables import check_pipeline, table_keys

console = log_console(stderr=False)  # whole tables and lines in a log file, as the commands print
MODELS = ("base", "tec_cache", "tec_online", "mae_more")
LABELS = {
    "base": "A_base: MAE base model",
    "tec_cache": "A_tec_cache: TEC student from the cache",
    "tec_online": "A_tec_online: TEC student, online base model",
    "mae_more": "A_mae_more: MAE base + the same extra epochs",
}


class Stages:
    """Runs named stages once: a finished stage's wall time is kept in state.json and not redone."""

    def __init__(self, out: Path) -> None:
        self.path = out / "state.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, argv: list[str], log: Path) -> float:
        if name in self.state:
            console.print(f"[dim]{name}: done before ({self.state[name]:.0f} s)[/]")
            return self.state[name]
        console.print(f"[bold]{name}[/]: {' '.join(argv[2:])}", highlight=False, soft_wrap=True)
        t0 = time.time()
        with open(log, "a", encoding="utf-8") as f:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT)  # plain lines, tables whole
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            sys.exit(f"error: stage {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        self.state[name] = time.time() - t0
        self.save()
        return self.state[name]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)


def _cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def run_seed(seed: int, pipe_ref: str, preset: dict[str, Any], data: Path, out: Path) -> dict[str, Any]:
    """Train the four models of one seed (resuming what exists); returns stage times and paths."""
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out)
    tc = [sys.executable, "-m", "tec_cache"]
    tt = [sys.executable, "-m", "tec_train"]
    pre = preset["pretrain"]
    p = ["--pipeline", pipe_ref, "--seed", str(seed)]
    log = out / "stages.log"
    times: dict[str, float] = {}
    times["base"] = st.run("base", [*tt, "run", *p, "--objective", "mae", "--data", str(data), "--run-dir", str(out / "base")], log)
    base_ckpt = latest_checkpoint(out / "base")
    assert base_ckpt is not None
    times["cache_build"] = st.run("cache_build", [*tc, "build", *p, "--data", str(data), "--checkpoint", str(base_ckpt),
                                                  "--out", str(out / "cache")], log)
    times["cache_verify"] = st.run("cache_verify", [*tc, "verify", str(out / "cache")], log)
    times["tec_cache"] = st.run("tec_cache", [*tt, "run", *p, "--cache", str(out / "cache"), "--run-dir", str(out / "tec_cache")], log)
    # The same target recipe as the cache (the pipeline's [cache] table), with the base model in the step.
    online = ["--online", "--checkpoint", str(base_ckpt), "--data", str(data)]
    times["tec_online"] = st.run("tec_online", [*tt, "run", *p, *online, "--run-dir", str(out / "tec_online")], log)
    times["mae_more"] = st.run("mae_more", [*tt, "run", *p, "--objective", "mae", "--data", str(data), "--init-from", str(base_ckpt),
                                            "--epochs", str(pre["epochs"]), "--warmup-epochs", str(pre["warmup_epochs"]),
                                            "--run-dir", str(out / "mae_more")], log)
    return {"times": times, "cache_bytes": _cache_bytes(out / "cache"), "runs": {m: str(out / m) for m in MODELS}}


def _pixels(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32)).flatten() / 255.0 for img, _ in ds])  # [N, 28*28*3]
    return x, torch.tensor([y for _, y in ds])


def evaluate(source: Path | torch.nn.Module | None, splits: tuple[Any, Any], ev: EvalConfig, seed: int) -> dict[str, Any]:
    """kNN and linear-probe top-1 of one model's frozen features: a run dir, a model, or None for raw pixels."""
    train_ds, test_ds = splits
    t0 = time.time()
    if source is None:
        (ftr, ytr), (fte, yte) = _pixels(train_ds), _pixels(test_ds)
    else:
        model = load_encoder(source)[0] if isinstance(source, Path) else source
        kw: dict[str, Any] = dict(batch_size=500, num_workers=0, pool=ev.pool, crop_pct=1.0)
        ftr, ytr = extract_features(model, train_ds, **kw)
        fte, yte = extract_features(model, test_ds, **kw)
    knn = knn_classify(ftr, ytr, fte, yte, k=ev.k, temperature=ev.temperature, num_classes=10)
    lin = linear_probe(ftr, ytr, fte, yte, epochs=ev.epochs, lr=ev.lr, seed=seed,
                       warmup_epochs=max(1, ev.epochs // 10), num_classes=10)
    return {"knn_top1": knn["top1"], "linear_top1": lin["last_top1"], "linear_best_top1": lin["best_top1"],
            "eval_s": time.time() - t0}


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


# A claim's verdict: True (holds), False (does not hold), or None: not tested, because a check
# against the seed spread needs at least two seeds (with one, the spread is 0 by construction).
Verdict = bool | None
NOT_TESTED = "not tested (one seed)"


def verdict_text(ok: Verdict, *, markdown: bool = False) -> str:
    if ok is None:
        return NOT_TESTED
    return "yes" if ok else ("**no**" if markdown else "no")


def verdict_line(ok: Verdict) -> str:
    """The console's word for a verdict (rich markup)."""
    if ok is None:
        return f"[yellow]{NOT_TESTED}[/]"
    return "[green]holds[/]" if ok else "[red]does not hold[/]"


def denominator(n: int, spread: float | None = None, scale: float = 100, digits: int = 2) -> str:
    """What a claim's numbers stand on: how many seeds the means are over, and their spread."""
    if n < 2:
        return "1 seed, no spread"
    return f"means of {n} seeds" + ("" if spread is None else f", seed spread {scale * spread:.{digits}f}")


def claims(results: dict[str, Any], seeds: list[int]) -> list[tuple[str, Verdict, str]]:
    """The paper's three claims, per probe, from the means over ``seeds``; each with its verdict and
    numbers that state their denominator. The seed-noise claim is not tested with one seed."""
    per = {m: {k: [results["seeds"][str(s)]["eval"][m][k] for s in seeds] for k in ("knn_top1", "linear_top1")} for m in MODELS}
    spread = {k: max(max(per[m][k]) - min(per[m][k]) for m in MODELS) for k in ("knn_top1", "linear_top1")}
    mean = {m: {k: statistics.mean(v) for k, v in per[m].items()} for m in MODELS}
    n = len(seeds)
    out: list[tuple[str, Verdict, str]] = []
    for k, name in (("knn_top1", "kNN"), ("linear_top1", "linear")):
        c, b, o, mm = (mean[x][k] for x in ("tec_cache", "base", "tec_online", "mae_more"))
        of = denominator(n, spread[k])
        out += [
            (f"{name}: A_tec_cache > A_base", c > b, f"{100 * c:.2f} vs {100 * b:.2f} ({of})"),
            (f"{name}: A_tec_cache >= A_mae_more", c >= mm, f"{100 * c:.2f} vs {100 * mm:.2f} ({of})"),
            (f"{name}: abs(A_tec_cache - A_tec_online) <= seed spread", abs(c - o) <= spread[k] if n > 1 else None,
             f"{100 * abs(c - o):.2f} vs spread {100 * spread[k]:.2f} ({of})"),
        ]
    return out


def summarise(results: dict[str, Any], seeds: list[int], out: Path, pipe_name: str) -> None:
    """Table per model (mean ± half-range over seeds), the three claims checked, results.md/json."""
    per = {m: {k: [results["seeds"][str(s)]["eval"][m][k] for s in seeds] for k in ("knn_top1", "linear_top1")} for m in MODELS}
    checked = claims(results, seeds)
    times = {k: statistics.mean(results["seeds"][str(s)]["times"][k] for s in seeds)
             for k in results["seeds"][str(seeds[0])]["times"]}
    cache_bytes = statistics.mean(results["seeds"][str(s)]["cache_bytes"] for s in seeds)
    lines = [f"Pipeline `{pipe_name}`, seeds {seeds} (mean ± half the range over seeds; spread = the largest range "
             f"of any model over the seeds), top-1 % on the "
             f"{results['test_images']} Fashion-MNIST test images; features: {results['pool']} pool, frozen.", "",
             "| model | kNN top-1 | linear-probe top-1 | stage wall time (s, mean) |", "|---|---|---|---|"]
    for m in MODELS:  # each model's training stage has the model's name
        lines.append(f"| {LABELS[m]} | {_fmt(per[m]['knn_top1'])} | {_fmt(per[m]['linear_top1'])} | {times[m]:.0f} |")
    for ref in ("random_init", "raw_pixels"):
        if ref in results:
            lines.append(f"| reference: {ref.replace('_', ' ')} | {100 * results[ref]['knn_top1']:.2f} | "
                         f"{100 * results[ref]['linear_top1']:.2f} | - |")
    lines += ["", f"Cache: {times['cache_build']:.0f} s to build, {cache_bytes / 1e6:.1f} MB on disk "
                  f"(verify {times['cache_verify']:.0f} s). Wall time per seed: "
                  f"{sum(times.values()):.0f} s including evaluation ({times['evaluation']:.0f} s).", "",
              "| claim | holds | numbers |", "|---|---|---|"]
    lines += [f"| {c} | {verdict_text(ok, markdown=True)} | {nums} |" for c, ok, nums in checked]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({**results, "claims": [{"claim": c, "holds": ok, "verdict": verdict_text(ok), "numbers": n}
                                                            for c, ok, n in checked]}, indent=1))
    t = Table(title=f"miniature reproduction ({pipe_name}, seeds {seeds})")
    for col in ("model", "kNN top-1 %", "linear top-1 %", "train s"):
        t.add_column(col)
    for m in MODELS:
        t.add_row(LABELS[m], _fmt(per[m]["knn_top1"]), _fmt(per[m]["linear_top1"]), f"{times[m]:.0f}")
    console.print(t)
    for c, ok, nums in checked:
        console.print(f"{verdict_line(ok)}  {c}  ({nums})", highlight=False)
    console.print(f"results: {out / 'results.md'}")


def pictures(seed_out: Path) -> None:
    """What the base model teaches (tec-cache show), the four runs' curves (tec-train plot), and the
    TEC student as a plain timm ViT (tec-train export), for one seed."""
    log = seed_out / "stages.log"
    jobs = [
        ("views.png", [sys.executable, "-m", "tec_cache", "show", str(seed_out / "cache"), "--n", "6", "--out", str(seed_out / "views.png")]),
        ("curves.png", [sys.executable, "-m", "tec_train", "plot", *(str(seed_out / m) for m in MODELS), "--smooth", "5",
                        "--out", str(seed_out / "curves.png")]),
        ("export", [sys.executable, "-m", "tec_train", "export", str(seed_out / "tec_cache"), "--out", str(seed_out / "export")]),
    ]
    for what, argv in jobs:
        with open(log, "a", encoding="utf-8") as f:
            ok = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode == 0
        console.print(f"{what}: {seed_out / what}" if ok else f"[red]{what} failed[/] (see {log})")


def add_references(results: dict[str, Any], preset: dict[str, Any], splits: tuple[Any, Any], ev: EvalConfig) -> None:
    """The probes' floors, once per results file: raw pixels, and a fresh, untrained encoder of the
    base model's size (what every pretraining must clearly beat)."""
    if "raw_pixels" not in results:
        results["raw_pixels"] = evaluate(None, splits, ev, 0)
    if "random_init" not in results:
        base = preset["base"]
        torch.manual_seed(0)
        results["random_init"] = evaluate(build_mae(base["model"], img_size=base["img_size"], depth=base["depth"]), splits, ev, 0)


def probe_setup(pipe: Any, root: Path, n_train: int, n_test: int) -> tuple[tuple[Any, Any], EvalConfig]:
    """The labelled splits the probes use and the pipeline's checked [eval] options. The kNN bank /
    probe training set is exactly the pretraining subset, with its labels."""
    train_ds, test_ds = FashionMNIST("train", root), FashionMNIST("test", root)
    splits = (Subset(train_ds, subset_indices(np.asarray(train_ds.targets), n_train).tolist()),
              Subset(test_ds, subset_indices(np.asarray(test_ds.targets), n_test).tolist()))
    ev = resolve(EvalConfig, table=pipe.table("eval", table_keys("eval"), required=False))
    check_fields(ev)
    return splits, ev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="fmnist-mini", help="preset with [data], [base], [cache], [pretrain], [eval]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "miniature")
    ap.add_argument("--fashion-mnist", type=Path, default=DEFAULT_DIR, help="folder with the four idx .gz files")
    args = ap.parse_args()
    pipe = load_pipeline(args.pipeline)
    preset = pipe.raw
    out = args.out / pipe.name
    out.mkdir(parents=True, exist_ok=True)
    check_pipeline(pipe)  # every table, [data] and [eval] included, names only real options
    sizes = resolve(DataSubsets, table=pipe.table("data", table_keys("data"), required=False))
    n_train, n_test = sizes.train_images, sizes.test_images
    try:
        data = export_image_folder(out / "fmnist-train", "train", n=n_train, root=args.fashion_mnist)
    except FileNotFoundError:
        sys.exit(f"error: {HOW_TO_GET}")
    splits, ev = probe_setup(pipe, args.fashion_mnist, n_train, n_test)
    res_path = out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results.update(pipeline=pipe.name, test_images=len(splits[1]), train_images=len(splits[0]), pool=ev.pool)
    results.setdefault("seeds", {})
    t_all = time.time()
    for seed in args.seeds:
        seed_out = out / f"seed-{seed}"
        done = results["seeds"].get(str(seed))
        if done and all(m in done.get("eval", {}) for m in MODELS):
            console.print(f"seed {seed}: done before")
            continue
        t_seed = time.time()
        r = run_seed(seed, str(pipe.path), preset, data, seed_out)
        r["eval"] = {}
        for m in MODELS:
            r["eval"][m] = evaluate(Path(r["runs"][m]), splits, ev, seed)
            console.print(f"seed {seed} {m}: kNN {100 * r['eval'][m]['knn_top1']:.2f}  linear {100 * r['eval'][m]['linear_top1']:.2f}")
        r["times"]["evaluation"] = sum(e["eval_s"] for e in r["eval"].values())
        r["seed_wall_s_this_invocation"] = time.time() - t_seed
        results["seeds"][str(seed)] = r
        res_path.write_text(json.dumps(results, indent=1))
    add_references(results, preset, splits, ev)
    res_path.write_text(json.dumps(results, indent=1))
    summarise(results, args.seeds, out, pipe.name)
    pictures(out / f"seed-{args.seeds[0]}")
    console.print(f"total wall time of this invocation: {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
