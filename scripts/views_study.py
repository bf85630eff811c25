"""How many views, how many bits: TEC students trained for many epochs from K cached view-epochs,
against fresh views every epoch and against a lower-bit codec, on real images.

Data flow, per seed, all through the project's own commands (``--pipeline fmnist-views``):
    Fashion-MNIST train subset --> tec-train run --objective mae                   (base)
      --> tec-cache build --views K_max (int8)  and  --codec int8-coarse            (training caches)
    Fashion-MNIST test subset  --> tec-cache build --views 1                       (held-out views)
      --> tec-train run --cache C --view-epochs K --val-cache held-out, K in --ks    (tec_k<K>)
      --> tec-train run --online (fresh views every epoch)                         (tec_online)
      --> tec-train run --cache C-coarse --view-epochs K_max                        (tec_k<K_max>_coarse)
      --> tec-train run --objective mae --init-from base, the same epochs           (mae_more)
    every model --> kNN and linear probe on frozen features, and top-1 after a short fine-tune.

Every student trains E epochs with E >= 4 x K_max, so a cached view is seen E / K times (with a
fresh mask each time): the point of the study. The held-out loss curves of the students (one line
per K) go to heldout.png (tec-train plot); the table to results.md and results.json.

    python scripts/views_study.py [--pipeline fmnist-views] [--seeds 0 1] [--out runs/views-study]

Re-running resumes: finished stages are skipped, an interrupted training run resumes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The miniature reproduction's stage runner and frozen-feature evaluation, shared.
_spec = importlib.util.spec_from_file_location("miniature", ROOT / "scripts" / "miniature.py")
assert _spec is not None and _spec.loader is not None
miniature = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(miniature)


from tec_cache.core.fashion_mnist import DEFAULT_DIR, HOW_TO_GET, export_image_folder
from tec_cache.runtime.config import resolve
from tec_cache.runtime.pipelines import load_pipeline
from tec_train.eval_config import DataSubsets
from tec_train.harness.checkpoints import latest_checkpoint
from tec_train.pipeline_tables import check_pipeline, table_keys

console = miniature.console


def student_names(ks: list[int]) -> list[str]:
    k_max = max(ks)
    return [*(f"tec_k{k}" for k in ks), "tec_online", f"tec_k{k_max}_coarse"]


def run_seed(seed: int, pipe_ref: str, preset: dict[str, Any], data: Path, held_out_images: Path, ks: list[int],
             out: Path) -> dict[str, Any]:
    """Every model of one seed (resuming what exists); returns stage times and run dirs."""
    out.mkdir(parents=True, exist_ok=True)
    st = miniature.Stages(out)
    tc = [sys.executable, "-m", "tec_cache"]
    tt = [sys.executable, "-m", "tec_train"]
    p = ["--pipeline", pipe_ref, "--seed", str(seed)]
    log = out / "stages.log"
    k_max, epochs = max(ks), preset["pretrain"]["epochs"]
    times: dict[str, float] = {}
    times["base"] = st.run("base", [*tt, "run", *p, "--objective", "mae", "--data", str(data), "--run-dir", str(out / "base")], log)
    base_ckpt = latest_checkpoint(out / "base")
    assert base_ckpt is not None
    build = [*tc, "build", *p, "--checkpoint", str(base_ckpt)]
    times["cache_build"] = st.run("cache_build", [*build, "--data", str(data), "--views", str(k_max), "--out", str(out / "cache")], log)
    times["cache_coarse_build"] = st.run("cache_coarse_build", [*build, "--data", str(data), "--views", str(k_max), "--codec",
                                                                "int8-coarse", "--out", str(out / "cache-coarse")], log)
    times["held_out_build"] = st.run("held_out_build", [*build, "--data", str(held_out_images), "--views", "1",
                                                        "--out", str(out / "held-out")], log)
    val = ["--val-cache", str(out / "held-out")]
    runs = {"base": out / "base", "mae_more": out / "mae_more"}
    for k in ks:
        runs[f"tec_k{k}"] = out / f"tec_k{k}"
        times[f"tec_k{k}"] = st.run(f"tec_k{k}", [*tt, "run", *p, "--cache", str(out / "cache"), "--view-epochs", str(k), *val,
                                                  "--run-dir", str(runs[f"tec_k{k}"])], log)
    runs["tec_online"] = out / "tec_online"
    times["tec_online"] = st.run("tec_online", [*tt, "run", *p, "--online", "--checkpoint", str(base_ckpt), "--data", str(data),
                                                *val, "--run-dir", str(runs["tec_online"])], log)
    coarse = f"tec_k{k_max}_coarse"
    runs[coarse] = out / coarse
    times[coarse] = st.run(coarse, [*tt, "run", *p, "--cache", str(out / "cache-coarse"), *val, "--run-dir", str(runs[coarse])], log)
    times["mae_more"] = st.run("mae_more", [*tt, "run", *p, "--objective", "mae", "--data", str(data), "--init-from", str(base_ckpt),
                                            "--epochs", str(epochs), "--warmup-epochs", str(preset["pretrain"]["warmup_epochs"]),
                                            "--run-dir", str(runs["mae_more"])], log)
    for name, run in runs.items():  # the paper's own metric, with the recipe of method.md 6 scaled down ([finetune])
        times[f"finetune_{name}"] = st.run(f"finetune_{name}", [*tt, "finetune", str(run), "--pipeline", pipe_ref, "--seed", str(seed),
                                                                "--fashion-mnist", "--run-dir", str(out / f"ft_{name}")], log)
    times["held_out_curves"] = st.run("held_out_curves", [*tt, "plot", *(str(runs[s]) for s in student_names(ks)),
                                                          "--out", str(out / "heldout.png")], log)
    return {"times": times, "runs": {m: str(r) for m, r in runs.items()},
            "cache_bytes": {"int8": miniature._cache_bytes(out / "cache"), "int8-coarse": miniature._cache_bytes(out / "cache-coarse")}}


def held_out_loss(run: Path) -> dict[str, float] | None:
    """The last held-out loss terms a run logged (None for runs without --val-cache)."""
    last = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss_fea" in rec:
            last = {"val_loss_fea": rec["val_loss_fea"], "val_loss_att": rec["val_loss_att"]}
    return last


def _per_seed(results: dict[str, Any], seeds: list[int], model: str, key: str) -> list[float]:
    vals = [results["seeds"][str(s)]["eval"][model].get(key) for s in seeds]
    return [v for v in vals if v is not None]


def answers(results: dict[str, Any], seeds: list[int], ks: list[int]) -> list[tuple[str, bool | None, str]]:  # miniature.Verdict: loaded at run time, mypy cannot name it
    """The study's questions, each answered from the numbers: a difference of means against the seed
    spread (the largest range over seeds of the two models compared), per metric; not tested where
    fewer than two seeds have the metric. Every line's numbers say how many seeds they are means of."""
    k_max = max(ks)
    checks = [(f"K = {k} within seed noise of online", f"tec_k{k}", "tec_online") for k in ks]
    checks.append((f"int8-coarse within seed noise of int8 (K = {k_max})", f"tec_k{k_max}_coarse", f"tec_k{k_max}"))
    # Top-1 in points; the held-out target loss (the most direct measure of what was learnt) as is.
    measures = (("knn_top1", "kNN", 100, 2), ("linear_top1", "linear", 100, 2), ("finetune_top1", "fine-tune", 100, 2),
                ("val_loss_fea", "held-out loss_fea", 1, 4), ("val_loss_att", "held-out loss_att", 1, 4))
    out = []
    for key, name, scale, digits in measures:
        for question, a, b in checks:
            va, vb = _per_seed(results, seeds, a, key), _per_seed(results, seeds, b, key)
            spread = max(max(va) - min(va), max(vb) - min(vb))
            diff = statistics.mean(va) - statistics.mean(vb)
            n = min(len(va), len(vb))
            out.append((f"{question}: {name}", abs(diff) <= spread if n > 1 else None,
                        f"{scale * diff:+.{digits}f} vs spread {scale * spread:.{digits}f} "
                        f"({miniature.denominator(n, spread, scale, digits)})"))
    for key, name in (("knn_top1", "kNN"), ("linear_top1", "linear")):
        vals = _per_seed(results, seeds, "base", key)
        base, rnd = statistics.mean(vals), results["random_init"][key]
        out.append((f"base beats an untrained encoder: {name}", base > rnd,
                    f"{100 * base:.2f} vs {100 * rnd:.2f} ({miniature.denominator(len(vals), _spread(vals))})"))
    for key, name in (("knn_top1", "kNN"), ("linear_top1", "linear"), ("finetune_top1", "fine-tune")):
        per = [_per_seed(results, seeds, m, key) for m in (f"tec_k{k_max}", "base", "mae_more")]
        tec, base, more = (statistics.mean(v) for v in per)
        of = miniature.denominator(min(len(v) for v in per), max(_spread(v) for v in per))
        out.append((f"TEC (K = {k_max}) > base: {name}", tec > base, f"{100 * tec:.2f} vs {100 * base:.2f} ({of})"))
        out.append((f"TEC (K = {k_max}) >= MAE for the same epochs: {name}", tec >= more,
                    f"{100 * tec:.2f} vs {100 * more:.2f} ({of})"))
    return out


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def summarise(results: dict[str, Any], seeds: list[int], models: list[str], ks: list[int], out: Path) -> None:
    """Mean and half-range over seeds of every metric, per model, and the answers; results.md."""
    metrics = ("knn_top1", "linear_top1", "finetune_top1", "val_loss_fea", "val_loss_att")
    lines = [f"Pipeline `{results['pipeline']}`, seeds {seeds}, {results['epochs']} epochs per student, "
             f"K_max = {results['k_max']}, {results['train_images']} training and {results['test_images']} test images "
             "(mean ± half the range over seeds).", "",
             "| model | kNN top-1 % | linear top-1 % | fine-tune top-1 % | held-out loss_fea | held-out loss_att | train s |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        cells = []
        for k in metrics:
            vals = _per_seed(results, seeds, m, k)
            if not vals:
                cells.append("-")
            elif k.endswith("top1"):
                cells.append(miniature._fmt(vals))
            else:
                cells.append(f"{statistics.mean(vals):.4f} ± {(max(vals) - min(vals)) / 2:.4f}")
        train_s = statistics.mean(results["seeds"][str(s)]["times"][m] for s in seeds)
        lines.append(f"| {m} | {' | '.join(cells)} | {train_s:.0f} |")
    for ref in ("random_init", "raw_pixels"):
        lines.append(f"| reference: {ref.replace('_', ' ')} | {100 * results[ref]['knn_top1']:.2f} | "
                     f"{100 * results[ref]['linear_top1']:.2f} | - | - | - | - |")
    seed_s = [sum(results["seeds"][str(s)]["times"].values()) for s in seeds]
    lines += ["", "Wall time per seed (every stage, evaluation included): "
              + ", ".join(f"seed {s} {t / 60:.1f} min" for s, t in zip(seeds, seed_s)) + ".", "",
              "| question | holds | numbers |", "|---|---|---|"]
    lines += [f"| {q} | {miniature.verdict_text(ok, markdown=True)} | {nums} |" for q, ok, nums in answers(results, seeds, ks)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines), highlight=False)


def held_out_figure(results: dict[str, Any], seeds: list[int], ks: list[int], out: Path) -> Path:
    """heldout-vs-epoch.png: each student's held-out loss_fea and loss_att against the epoch, mean
    over seeds, one line per K (and online, and the lower-bit codec)."""
    from matplotlib.figure import Figure

    from tec_cache.core.figures import save_png

    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for i, name in enumerate(student_names(ks)):
        curves = []
        for s in seeds:
            recs = [json.loads(line) for line in (Path(results["seeds"][str(s)]["runs"][name]) / "metrics.jsonl")
                    .read_text().splitlines()]
            curves.append({r["epoch_f"]: r for r in recs if "val_loss_fea" in r})
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        for ax, key in zip(axes, ("val_loss_fea", "val_loss_att")):
            ax.plot(epochs, [statistics.mean(c[e][key] for c in curves) for e in epochs], color=f"C{i}", label=name,
                    linestyle="--" if name == "tec_online" else "-")
    for ax, key in zip(axes, ("held-out loss_fea", "held-out loss_att")):
        ax.set_xlabel("epoch")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"TEC students from K cached view-epochs, {results['epochs']} epochs, mean over seeds {seeds}", fontsize=10)
    return save_png(fig, out / "heldout-vs-epoch.png", "--out")


def _merge_seed(path: Path, seed: int, r: dict[str, Any]) -> None:
    """Write one seed's results into results.json as it is now: seeds may run side by side."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("seeds", {})[str(seed)] = r
    tmp = path.with_suffix(f".tmp{seed}")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="fmnist-views", help="pipeline with [data], [base], [cache], [pretrain], [finetune], [eval]")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="view-epochs K the students train from; the "
                    "cache holds the largest")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "views-study")
    ap.add_argument("--fashion-mnist", type=Path, default=DEFAULT_DIR, help="folder with the four idx .gz files")
    args = ap.parse_args()
    pipe = load_pipeline(args.pipeline)
    preset = pipe.raw
    check_pipeline(pipe)
    ks = sorted(set(args.ks))
    epochs = preset["pretrain"]["epochs"]
    if epochs < 4 * max(ks):
        sys.exit(f"error: --pipeline {pipe.name}: [pretrain] epochs = {epochs}; the study needs at least 4 x K_max = "
                 f"{4 * max(ks)} (views seen many times over is the point)")
    out = args.out / pipe.name
    out.mkdir(parents=True, exist_ok=True)
    sizes = resolve(DataSubsets, table=pipe.table("data", table_keys("data"), required=False))
    try:
        data = export_image_folder(out / "fmnist-train", "train", n=sizes.train_images, root=args.fashion_mnist)
        held_out_images = export_image_folder(out / "fmnist-held-out", "test", n=sizes.test_images, root=args.fashion_mnist)
    except FileNotFoundError:
        sys.exit(f"error: {HOW_TO_GET}")
    splits, ev = miniature.probe_setup(pipe, args.fashion_mnist, sizes.train_images, sizes.test_images)
    models = ["base", *student_names(ks), "mae_more"]
    res_path = out / "results.json"
    done_before = json.loads(res_path.read_text()).get("seeds", {}) if res_path.is_file() else {}
    t_all = time.time()
    for seed in args.seeds:
        seed_out = out / f"seed-{seed}"
        done = done_before.get(str(seed))
        if done and all(m in done.get("eval", {}) for m in models):
            console.print(f"seed {seed}: done before")
            continue
        r = run_seed(seed, str(pipe.path), preset, data, held_out_images, ks, seed_out)
        r["eval"] = {}
        for m in models:
            e = miniature.evaluate(Path(r["runs"][m]), splits, ev, seed)
            e.update(held_out_loss(Path(r["runs"][m])) or {})
            e["finetune_top1"] = json.loads((seed_out / f"ft_{m}" / "result.json").read_text())["last_top1"]
            r["eval"][m] = e
            console.print(f"seed {seed} {m}: kNN {100 * e['knn_top1']:.2f}  linear {100 * e['linear_top1']:.2f}  "
                          f"fine-tune {100 * e['finetune_top1']:.2f}", highlight=False)
        r["times"]["evaluation"] = sum(e["eval_s"] for e in r["eval"].values())
        _merge_seed(res_path, seed, r)
    results = json.loads(res_path.read_text())  # every seed, also those other invocations ran
    results.update(pipeline=pipe.name, epochs=epochs, k_max=max(ks), ks=ks, train_images=sizes.train_images,
                   test_images=sizes.test_images)
    miniature.add_references(results, preset, splits, ev)
    res_path.write_text(json.dumps(results, indent=1))
    summarise(results, args.seeds, models, ks, out)
    console.print(f"held-out loss against the epoch: {held_out_figure(results, args.seeds, ks, out)}")
    console.print(f"total wall time of this invocation: {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
