"""
Comparisons: every method for every seed on the same data and backbone, then what a reader of the
paper needs from them: mean ± std over seeds, each method's paired difference to Local, each
ablation's to Pilot, the paper's claims with a verdict, and plots.

    python compare.py --scenario A --methods all --jobs 2           # runs/compare-A, seeds 0-4
    python compare.py --scenario A --methods pilot --top-m 1 --jobs 2   # pilot-top1 beside them
    python compare.py runs/compare-A                                # the summaries again, from the runs
    python compare.py runs/compare-A runs/compare-B --into RESULTS.md README.md --figures docs/figures
                                    # and their tables there, their plots as docs/figures/<scenario>-*.png

A comparison directory holds one run per method and seed (<label>-seed<s>, a run.py output); its
summary (compare.json, compare.md, scores.png, rounds.png) covers every run in it. Any run.py flag
is a comparison flag (--help). matplotlib is optional: without it the plots are skipped, with one
line saying so.
"""
import argparse
import functools
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import run
from config import METHODS

SEEDS = [0, 1, 2, 3, 4]                   # a comparison's seeds unless --seeds is given
BOUNDS = ("local", "centralized")          # the benchmark's own noise: its spread targets apply to these
SPREAD_TARGETS = {"average": 3.0, "task": 10.0}   # std over seeds in % of the mean
ROUND_CURVES = ("local", "centralized", "fedavg", "pilot")
# The paper's claims, each a paired difference on the average score: (claim, method, baseline).
CLAIMS = [("Pilot above FedAvg-style FedIT", "pilot", "fedavg"),
          ("Pilot above Local", "pilot", "local"),
          ("stage 1's task / client split helps", "pilot", "pilot-no-stage1"),
          ("CT-MoA helps", "pilot", "pilot-no-ctmoa"),
          ("ATA helps over averaging the text adapters", "pilot", "pilot-no-ata"),
          ("the client adapter in stage 2 helps", "pilot", "pilot-no-client-s2")]


# ----------------------------------------------------------------------------- running
def run_comparison(cfg, methods, seeds, jobs=1, log=print, threads=None):
    """Every method for every seed (run.run with cfg's other settings, each run in
    <out>/<label>-seed<s>, the label being the method, with -top<M> when --top-m is given), each
    with the test loss after every round; then the summaries of every run in out.

    jobs > 1 runs that many at once, each in its own process with `threads` threads (default: the
    threads torch would use, divided by jobs), its log in <run>/run.log: a tiny run keeps a second
    thread only partly busy. A run's results do not depend on how many runs share the machine."""
    t0 = time.time()
    out = Path(cfg.out or f"runs/compare-{cfg.scenario}")
    label = (lambda m: m) if cfg.top_m is None else (lambda m: f"{m}-top{cfg.top_m}")
    cfgs = [replace(cfg, method=m, seed=s, out=str(out / f"{label(m)}-seed{s}"), test_loss_every_round=True)
            for m in methods for s in seeds]
    if jobs > 1:
        _run_side_by_side(cfgs, jobs, threads, log)
    else:
        for c in cfgs:
            run.run(c, log=log)
    summary = write(out, log)
    log(f"{len(cfgs)} runs in {time.time() - t0:.0f} s")
    return summary


def _run_side_by_side(cfgs, jobs, threads, log):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import torch
    threads = threads or max(1, torch.get_num_threads() // jobs)
    log(f"{len(cfgs)} runs, {jobs} at a time, {threads} thread(s) each; each run's log in its directory's run.log")
    # spawn, not fork: a forked child of a process that has run torch's thread pools can hang
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_logged, c, threads): c for c in cfgs}
        try:
            for i, f in enumerate(as_completed(futures), 1):
                res = f.result()
                log(f"{Path(futures[f].out).name}: average {res['average']:.2f}, test loss {res['average_ce']:.4f}, "
                    f"{res['wall_s']:.0f} s ({i}/{len(cfgs)})")
        except BaseException:
            for f in futures:
                f.cancel()          # a failed run ends the comparison, as it does one run at a time
            raise


def _run_logged(cfg, threads):
    import torch
    from transformers.utils import logging as hf_logging
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "run.log", "w") as f:
        return run.run(cfg, log=lambda *a: print(*a, file=f, flush=True))


# ----------------------------------------------------------------------------- statistics
def _mean_std(xs, digits=2):
    # sample standard deviation (n − 1); 0 for a single seed
    return {"mean": round(statistics.fmean(xs), digits), "std": round(statistics.stdev(xs), digits) if len(xs) > 1 else 0.0}


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """Student's t quantile, by bisection on its CDF (Simpson's rule on the density)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)

    def cdf(x, n=2000):
        h = x / n
        return 0.5 + h / 3 * sum(density(i * h) * (1 if i in (0, n) else 4 if i % 2 else 2) for i in range(n + 1))
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(runs, base, key="average", digits=2):
    """The per-seed difference run[key] − base[key] (same seed, same data): mean ± std, the 90%
    interval of its mean (Student's t over the seeds), the seeds whose difference has the mean's
    sign, and the verdict: "above" or "below" when the interval excludes 0, else "undecided"."""
    pick = (lambda r: r[key]) if "." not in key else (lambda r: r[key.split(".")[0]][key.split(".")[1]])
    d = [pick(r) - pick(b) for r, b in zip(runs, base)]
    mean = statistics.fmean(d)
    out = {**_mean_std(d, digits), "low": None, "high": None, "per_seed": [round(x, digits) for x in d],
           "same_sign": sum((x > 0) == (mean > 0) and x != 0 for x in d), "seeds": len(d), "verdict": "undecided"}
    if len(d) > 1:
        half = t_quantile(0.95, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        out.update(low=round(mean - half, digits), high=round(mean + half, digits),
                   verdict="above" if mean - half > 0 else "below" if mean + half < 0 else "undecided")
    return out


def chi2_cdf(x, k):
    """P(X <= x) for a chi-square law with k degrees of freedom (the regularised lower incomplete
    gamma function P(k/2, x/2), from its power series)."""
    a, z = k / 2, x / 2
    if z <= 0:
        return 0.0
    term = total = 1.0 / a
    n = 0
    while term > 1e-15 * total:
        n += 1
        term *= z / (a + n)
        total += term
    return min(1.0, total * math.exp(a * math.log(z) - z - math.lgamma(a)))


def std_interval(n, level=0.9):
    """Factors (lo, hi) such that [lo s, hi s] is the `level` confidence interval of a normal law's
    standard deviation from the sample std s of n draws (s² (n − 1) / σ² is chi-square with n − 1
    degrees of freedom). Five seeds give about [0.65 s, 2.37 s]."""
    k, tail = n - 1, (1 - level) / 2

    def quantile(p):
        lo, hi = 0.0, 10.0 * k + 100.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if chi2_cdf(mid, k) < p else (lo, mid)
        return (lo + hi) / 2
    return math.sqrt(k / quantile(1 - tail)), math.sqrt(k / quantile(tail))


def spread(ms, n, target=None):
    """A score's std over n seeds in % of its mean with its 90% interval; with a target (the bounds),
    "within" / "above" / "undecided" against it."""
    if not ms["mean"]:
        return None
    lo, hi = std_interval(n)
    rel = 100 * ms["std"] / ms["mean"]
    out = {"percent": round(rel, 2), "low": round(rel * lo, 2), "high": round(rel * hi, 2)}
    if target is not None:
        out["verdict"] = "within" if rel * hi <= target else "above" if rel * lo > target else "undecided"
    return out


# ----------------------------------------------------------------------------- summaries
def load(out: Path):
    """(seeds, {label: [results.json per seed]}) of a comparison directory's <label>-seed<s> runs,
    labels in METHODS' order first; every label must have every seed."""
    found = {}
    for f in sorted(Path(out).glob("*-seed*/results.json")):
        m = re.fullmatch(r"(.+)-seed(\d+)", f.parent.name)
        if m:
            found.setdefault(m[1], {})[int(m[2])] = json.loads(f.read_text())
    if not found:
        raise FileNotFoundError(f"{out}: no <method>-seed<s>/results.json")
    seeds = sorted({s for runs in found.values() for s in runs})
    for m, runs in found.items():
        if sorted(runs) != seeds:
            raise ValueError(f"{out}: {m} lacks seeds {sorted(set(seeds) - set(runs))} that another method has")
    order = list(METHODS)
    labels = sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m))
    return seeds, {m: [found[m][s] for s in seeds] for m in labels}


def ata_by_task(res):
    """{task t: {task u: the share of t's clients' Top-M neighbours, over every round, that hold
    task u}} of one run ({} without ATA): who fills a client's neighbourhood besides its partner."""
    task = {str(c["id"]): c["task"] for c in res["clients"]}
    counts = {}
    for rec in res.get("ata", []):
        for k, nb in rec["neighbours"].items():
            row = counts.setdefault(task[k], {})
            for j in nb:
                row[task[str(j)]] = row.get(task[str(j)], 0) + 1
    order = list(dict.fromkeys(c["task"] for c in res["clients"]))
    return {t: {u: round(row.get(u, 0) / max(1, sum(row.values())), 3) for u in order} for t, row in
            sorted(counts.items(), key=lambda kv: order.index(kv[0]))}


def summarise(scenario, seeds, results):
    """results: {label: [results.json per seed]} -> compare.json's content."""
    base, pilot = results.get("local"), results.get("pilot")
    out = {}
    for m, runs in results.items():
        tasks = list(runs[0]["per_task"])
        per_task = {t: _mean_std([r["per_task"][t] for r in runs]) for t in tasks}
        average = _mean_std([r["average"] for r in runs])
        ata = [rd for r in runs for rd in r.get("ata", [])]
        out[m] = {
            "per_task": per_task, "average": average, "per_seed": [r["average"] for r in runs],
            "per_task_per_seed": {t: [r["per_task"][t] for r in runs] for t in tasks},
            "per_task_ce": {t: _mean_std([r["per_task_ce"][t] for r in runs], 4) for t in tasks},
            "average_ce": _mean_std([r["average_ce"] for r in runs], 4),
            "vs_local": {k: paired(runs, base, k) for k in ["average"] + [f"per_task.{t}" for t in tasks]} if base else None,
            "ce_vs_local": paired(runs, base, "average_ce", 4) if base else None,
            "vs_pilot": {k: paired(runs, pilot, k) for k in ["average"] + [f"per_task.{t}" for t in tasks]}
            if pilot and m.startswith("pilot") and m != "pilot" else None,
            "ce_vs_pilot": paired(runs, pilot, "average_ce", 4) if pilot and m.startswith("pilot") and m != "pilot" else None,
            "spread": {c: spread(v, len(runs), SPREAD_TARGETS["average" if c == "average" else "task"] if m in BOUNDS else None)
                       for c, v in {**per_task, "average": average}.items()} if len(runs) > 1 else None,
            "ata_same_task": round(statistics.fmean(rd["same_task_mean"] for rd in ata), 3) if ata else None,
            "ata_other_task_weight": round(statistics.fmean(rd["other_task_weight_mean"] for rd in ata), 3) if ata else None,
            "ata_by_task": [ata_by_task(r) for r in runs] if ata else None,
            "rounds": [{"round": rd["round"], "average_ce": _mean_std([r["rounds"][i]["average_ce"] for r in runs], 4),
                        "average": _mean_std([r["rounds"][i]["average"] for r in runs]) if "average" in rd else None}
                       for i, rd in enumerate(runs[0]["rounds"]) if "average_ce" in rd],
            "kb_up_per_round": runs[0]["bytes_up"] / 1e3 / _rounds(runs[0]),
            "kb_down_per_round": runs[0]["bytes_down"] / 1e3 / _rounds(runs[0]),
            "trainable_params": runs[0]["trainable_params"], "communicated_params": runs[0]["communicated_params"],
            "rounds_stage1": runs[0]["config"]["rounds_stage1"],
            "wall_s": round(sum(r["wall_s"] for r in runs), 1),
        }
    claims = []
    for claim, m, b in CLAIMS:
        if m in results and b in results:
            d = paired(results[m], results[b])
            claims.append({"claim": claim, "method": m, "baseline": b, **d,
                           "verdict": {"above": "holds", "below": "does not hold", "undecided": "undecided"}[d["verdict"]]})
    return {"scenario": scenario, "seeds": list(seeds), "methods": out, "claims": claims}


def _rounds(res):
    c = res["config"]
    return max(1, c["rounds_stage1"] + c["rounds_stage2"])


# ----------------------------------------------------------------------------- tables
def _pm(v, f=".1f"):
    return "–" if v is None else f"{v['mean']:{f}} ± {v['std']:{f}}"


def _diff(v, f=".1f"):
    return "–" if v is None else f"{v['mean']:+{f}} ± {v['std']:{f}} ({v['same_sign']}/{v['seeds']})"


def sections(summary):
    """compare.md's tables, by name: results, ablations, claims, spreads, ata, costs."""
    ms, seeds = summary["methods"], summary["seeds"]
    tasks = list(next(iter(ms.values()))["per_task"])
    head = lambda cols: ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    best = {c: max((v["average"] if c == "average" else v["per_task"][c])["mean"] for v in ms.values())
            for c in tasks + ["average"]}
    cell = lambda v, c: (lambda t: f"**{t}**" if v["mean"] == best[c] else t)(_pm(v))
    s = {}
    lines = [f"Scenario {summary['scenario']}, seeds {', '.join(map(str, seeds))}: mean ± std over seeds; Δ: the "
             "paired difference to Local (per seed, then mean ± std; in brackets the seeds of "
             f"{len(seeds)} on its side of 0); test loss: mean answer-token cross-entropy on the test sets", "",
             *head(["method", *tasks, "average", "Δ average vs local", "test loss", "Δ test loss vs local"])]
    for m, v in ms.items():
        lines.append(f"| {m} | " + " | ".join(cell(v["per_task"][t], t) for t in tasks) + f" | {cell(v['average'], 'average')} | "
                     f"{_diff(v['vs_local'] and v['vs_local']['average'])} | {_pm(v['average_ce'], '.3f')} | "
                     f"{_diff(v['ce_vs_local'], '.3f')} |")
    s["results"] = "\n".join(lines)
    rows = {m: v for m, v in ms.items() if v["vs_pilot"]}
    if rows:
        lines = [f"What removing a part costs, or what another M does: the paired difference to Pilot per task and on "
                 f"average (mean ± std over seeds; the seeds of {len(seeds)} on its side of 0)", "",
                 *head(["method", *tasks, "average", "test loss"])]
        for m, v in rows.items():
            lines.append(f"| {m} | " + " | ".join(_diff(v["vs_pilot"][f"per_task.{t}"]) for t in tasks)
                         + f" | {_diff(v['vs_pilot']['average'])} | {_diff(v['ce_vs_pilot'], '.3f')} |")
        s["ablations"] = "\n".join(lines)
    if summary["claims"]:
        lines = ["The paper's claims on the average score: the paired difference (mean ± std over seeds), its 90% "
                 "interval (Student's t), the seeds on its side of 0; holds / does not hold when the interval "
                 "excludes 0, else undecided", "", *head(["claim", "difference", "90% interval", "seeds", "verdict"])]
        for c in summary["claims"]:
            ci = "–" if c["low"] is None else f"[{c['low']:+.1f}, {c['high']:+.1f}]"
            lines.append(f"| {c['claim']} ({c['method']} − {c['baseline']}) | {c['mean']:+.1f} ± {c['std']:.1f} | "
                         f"{ci} | {c['same_sign']}/{c['seeds']} | **{c['verdict']}** |")
        s["claims"] = "\n".join(lines)
    if next(iter(ms.values()))["spread"]:
        lo, hi = std_interval(len(seeds))
        lines = [f"Spread over seeds: the std in % of the mean, with its 90% interval ([{lo:.2f}, {hi:.2f}] x for "
                 f"{len(seeds)} seeds). The bounds against the benchmark's targets (≤ {SPREAD_TARGETS['average']:g}% "
                 f"on average, ≤ {SPREAD_TARGETS['task']:g}% per task): ✓ within, ✗ above, ? undecided; a federated "
                 "method's spread is a property of the method", "", *head(["method", *tasks, "average"])]
        mark = {"within": " ✓", "above": " ✗", "undecided": " ?"}
        fmt = lambda x: "–" if x is None else f"{x['percent']:.1f} [{x['low']:.1f}, {x['high']:.1f}]{mark.get(x.get('verdict'), '')}"
        for m, v in ms.items():
            lines.append(f"| {m} | " + " | ".join(fmt(v["spread"][c]) for c in tasks + ["average"]) + " |")
        s["spreads"] = "\n".join(lines)
    with_ata = {m: v for m, v in ms.items() if v["ata_by_task"]}
    if with_ata:
        lines = ["ATA's neighbourhoods: the share of a client's Top-M neighbours that hold its own task, and of its "
                 "personalised Θ̄^l that comes from clients of other tasks (mean over clients, rounds, seeds); then, by "
                 "task, which tasks fill the neighbourhoods (one figure per seed)", "",
                 *head(["method", "own task among neighbours", "Θ̄^l from other tasks", "clients of → neighbours holding"])]
        for m, v in with_ata.items():
            by = "; ".join(f"{t} → " + ", ".join(f"{u} " + "/".join(f"{p[t][u]:.2f}" for p in v["ata_by_task"])
                                                  for u in v["ata_by_task"][0][t]) for t in v["ata_by_task"][0])
            lines.append(f"| {m} | {v['ata_same_task']:.2f} | {v['ata_other_task_weight']:.2f} | {by} |")
        s["ata"] = "\n".join(lines)
    lines = ["Per round, all clients together: kB uploaded and downloaded; per client: parameters trained and "
             "communicated; a run's wall time (mean over seeds)", "", *head(["method", "kB up", "kB down", "trainable", "communicated", "s a run"])]
    for m, v in ms.items():
        lines.append(f"| {m} | {v['kb_up_per_round']:,.0f} | {v['kb_down_per_round']:,.0f} | {v['trainable_params']:,} | "
                     f"{v['communicated_params']:,} | {v['wall_s'] / len(seeds):.0f} |")
    s["costs"] = "\n".join(lines)
    return s


# ----------------------------------------------------------------------------- plots
def plots(summary, out: Path) -> str:
    """scores.png: one panel per task and the average, each on its own scale, each method's mean
    (a bar) and every seed (a dot). rounds.png: the test loss after every round (mean over seeds,
    the band ± std) for Local, Centralized, FedAvg and Pilot, with the final score beside it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plots (pip install matplotlib); tables written"
    ms = summary["methods"]
    tasks = list(next(iter(ms.values()))["per_task"]) + ["average"]
    names = {"caption": "captioning (CIDEr-D)", "vqa": "VQA (accuracy)", "grounding": "grounding (Acc@IoU≥0.5)",
             "ocr": "text reading (accuracy)", "average": "average over tasks"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.35 * len(ms) + 2.2), sharey=True)
    for ax, t in zip(axes, tasks):
        for i, (m, v) in enumerate(ms.items()):
            seeds = v["per_seed"] if t == "average" else v["per_task_per_seed"][t]
            ax.barh(i, statistics.fmean(seeds), color="C0" if m.startswith("pilot") else "C7", alpha=0.5)
            ax.plot(seeds, [i] * len(seeds), "k.", ms=4)
        ax.set_title(names.get(t, t), fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(ms)), list(ms))
    axes[0].invert_yaxis()
    fig.suptitle(f"Scenario {summary['scenario']}: mean over seeds {summary['seeds']} (bar) and each seed (dot)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)

    curves = {m: v for m, v in ms.items() if m in ROUND_CURVES and len(v["rounds"]) > 1}
    if not curves:
        return f"wrote {out}/scores.png (no run has a round-by-round test loss)"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    for i, (m, v) in enumerate(curves.items()):
        xs = [r["round"] for r in v["rounds"]]
        mean = [r["average_ce"]["mean"] for r in v["rounds"]]
        std = [r["average_ce"]["std"] for r in v["rounds"]]
        ax.plot(xs, mean, label=m, color=f"C{i}")
        ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], color=f"C{i}", alpha=0.2)
        bx.plot(v["per_seed"], [i] * len(v["per_seed"]), ".", color=f"C{i}")
        bx.plot([v["average"]["mean"]], [i], "|", color=f"C{i}", ms=14)
    r1 = next(iter(curves.values()))["rounds_stage1"]
    ax.axvline(r1 + 0.5, color="grey", lw=0.8, ls=":")
    ax.text(r1 + 0.6, ax.get_ylim()[1], "stage 2 →", va="top", fontsize=8, color="grey")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("test loss (answer tokens, teacher-forced)")
    ax.legend(fontsize=8)
    ax.set_title(f"Scenario {summary['scenario']}: test loss after each round (± std over seeds)", fontsize=10)
    bx.set_yticks(range(len(curves)), list(curves))
    bx.invert_yaxis()
    bx.set_title("final average score (seeds, mean |)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=110)
    plt.close(fig)
    return f"wrote {out}/scores.png, {out}/rounds.png"


# ----------------------------------------------------------------------------- writing
def write(out: Path, log=print):
    """compare.json, compare.md and the plots of every run in out; returns the summary."""
    seeds, results = load(out)
    summary = summarise(next(iter(results.values()))[0]["scenario"], seeds, results)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    parts = sections(summary)
    (out / "compare.md").write_text("\n\n".join(parts.values()) + "\n")
    log("\n" + "\n\n".join(parts.values()))
    log(plots(summary, out))
    log(f"wrote {out}/compare.json, compare.md")
    return summary


def into(path: Path, tables: dict):
    """Replace every block <!-- compare <scenario> <section> --> ... <!-- end --> of a markdown file
    with that section of that scenario's compare.md (tables: {scenario: sections(...)})."""
    text = path.read_text()
    block = re.compile(r"(<!-- compare (\S+) (\S+) -->\n).*?(<!-- end -->)", re.S)

    def fill(m):
        if m[2] not in tables or m[3] not in tables[m[2]]:
            raise KeyError(f"{path}: no section {m[3]!r} of scenario {m[2]!r} among the comparisons given")
        return m[1] + tables[m[2]][m[3]] + "\n" + m[4]
    path.write_text(block.sub(fill, text))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dirs = [a for a in argv if not a.startswith("-") and Path(a).is_dir()]
    if dirs:   # summarise existing comparisons (and fill their tables into documents, copy their plots)
        ap = argparse.ArgumentParser(description="Summarise comparisons again from their runs.")
        ap.add_argument("dirs", nargs="+", help="comparison directories (runs/compare-A ...)")
        ap.add_argument("--into", nargs="*", default=[], help="markdown files whose compare blocks to fill")
        ap.add_argument("--figures", help="a folder to copy each comparison's plots to, as <scenario>-<plot>.png")
        a = ap.parse_args(argv)
        tables = {}
        for d in map(Path, a.dirs):
            summary = write(d)
            tables[summary["scenario"]] = sections(summary)
            for name in ("scores", "rounds") if a.figures else ():
                if (d / f"{name}.png").is_file():
                    Path(a.figures).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(d / f"{name}.png", Path(a.figures) / f"{summary['scenario']}-{name}.png")
        for f in a.into:
            into(Path(f), tables)
            print(f"filled {f}")
        return
    ap = run.arg_parser("Run a comparison: every method for every seed (any run.py flag applies to every run).")
    ap.add_argument("--methods", default="pilot", help="comma-separated methods, or 'all'")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with its share of the threads")
    cfg, a = run.parse_config(argv, ap)
    methods = list(METHODS) if a.methods == "all" else a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: at least 1")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    run_comparison(cfg, methods, [int(s) for s in a.seeds.split(",")], a.jobs)


if __name__ == "__main__":
    main()
