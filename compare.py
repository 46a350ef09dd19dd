"""
Comparisons: every method for every seed (run_comparison), then summaries of the runs: mean ± std
over seeds per method, each method's paired difference to Local (the per-seed difference, then its
mean ± std), the spread targets, a paper-style markdown table, plots.

    python run.py --scenario A --methods all          # seeds 0-4 by default; runs everything, then calls these
    python run.py --scenario A --methods all --jobs 2 # two runs at once, one thread each
    python compare.py runs/compare-A                  # the summaries again, from the runs' results.json
                                                      # and predictions files (where the spread comes from)

The summaries are pure functions of results.json contents (spread_sources reads the predictions
files too); matplotlib is optional (plots are skipped, with one line saying so, when it is not
installed).
"""
import json
import math
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


def run_comparison(cfg, methods, seeds, jobs=1, log=print, threads=None):
    """Every method for every seed on the same data and backbone (run.run with cfg's other
    settings, each run in <out>/<method>-seed<s>), then compare.json / .md / plots in out.

    jobs > 1 runs that many at once, each in its own process with `threads` threads (default: the
    threads torch would use, divided by jobs), its log in <run>/run.log. Why: a tiny run keeps a
    second thread only partly busy, so one-thread runs side by side finish a comparison sooner. A
    run's results do not depend on how many runs share the machine; they depend on its thread count
    only where that changes the rounding (README, "Time and memory", has the figures for both)."""
    import run      # run.py imports this module for its summaries
    t0 = time.time()
    out = Path(cfg.out or f"runs/compare-{cfg.scenario}")
    # an explicit M is part of the label (pilot-top1), so that runs of several M share one directory
    label = (lambda m: m) if cfg.top_m is None else (lambda m: f"{m}-top{cfg.top_m}")
    cfgs = {(m, s): replace(cfg, method=m, seed=s, out=str(out / f"{label(m)}-seed{s}"), test_loss_every_round=True)
            for m in methods for s in seeds}
    if jobs > 1:
        done = _run_side_by_side(cfgs, jobs, threads, log)
    else:
        done = {key: run.run(c, log=log) for key, c in cfgs.items()}
    # the summary covers every run in the directory, these and earlier ones (another M, say)
    seeds, results = load(out, list(run.METHODS))
    summary = summarise(cfg.scenario, seeds, results)
    summary["spread_sources"] = spread_sources(out, seeds, results) if len(seeds) > 1 else None
    summary["wall_s"] = round(time.time() - t0, 1)
    write(summary, out, log)
    log(f"wrote {out}/compare.json, compare.md; wall time {summary['wall_s']:.0f} s")
    return summary


def _run_side_by_side(cfgs, jobs, threads, log):
    """{(method, seed): results} of cfgs' runs, `jobs` at a time in worker processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import torch
    import backbone
    if any(c.backbone == "tiny" for c in cfgs.values()):
        backbone.tiny_backbone_dir(log)     # built once, here, rather than by every worker at once
    threads = threads or max(1, torch.get_num_threads() // jobs)
    log(f"{len(cfgs)} runs, {jobs} at a time, {threads} thread(s) each; each run's log in its directory's run.log")
    done = {}
    # spawn, not fork: a forked child of a process that has run torch's thread pools can hang
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_logged, c, threads, dict(backbone.PRETRAIN)): key for key, c in cfgs.items()}
        try:
            for f in as_completed(futures):
                (m, s), res = futures[f], f.result()
                done[m, s] = res
                log(f"{m} seed {s}: average {res['average']:.2f}, test loss {res['average_ce']:.4f}, "
                    f"{res['wall_s']:.0f} s ({len(done)}/{len(cfgs)})")
        except BaseException:
            for f in futures:
                f.cancel()          # a failed run ends the comparison, as it does one run at a time
            raise
    return done


def _run_logged(cfg, threads, pretrain):
    """One run in a worker process: the parent's thread share and tiny-backbone recipe, the log in
    <out>/run.log."""
    import torch
    from transformers.utils import logging as hf_logging
    import backbone
    import run
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    backbone.PRETRAIN.update(pretrain)   # a recipe changed in the parent (RESULTS.md's commands) holds here too
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "run.log", "w") as f:
        return run.run(cfg, log=lambda *a: print(*a, file=f, flush=True))


# the benchmark's spread targets, in percent of the mean: the average's std over seeds, and each task's
SPREAD_TARGETS = {"average": 3.0, "task": 10.0}


def chi2_cdf(x, k):
    """P(X <= x) for a chi-square law with k degrees of freedom: the regularised lower incomplete
    gamma function P(k/2, x/2), from its power series (exact to ~1e-12 for the sizes used here)."""
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


def chi2_quantile(p, k):
    """x with chi2_cdf(x, k) = p, by bisection."""
    lo, hi = 0.0, 10.0 * k + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_cdf(mid, k) < p else (lo, mid)
    return (lo + hi) / 2


def std_interval(n, level=0.9):
    """Factors (lo, hi) such that [lo s, hi s] is the `level` confidence interval of a normal law's
    standard deviation from the sample std s of n draws: s² (n − 1) / σ² is chi-square with n − 1
    degrees of freedom. Five seeds give about [0.65 s, 2.37 s]: a five-seed spread is a loose estimate."""
    k, tail = n - 1, (1 - level) / 2
    return math.sqrt(k / chi2_quantile(1 - tail, k)), math.sqrt(k / chi2_quantile(tail, k))


def spread_check(ms, n, target, level=0.9):
    """A score's std over n seeds as a percent of its mean, with its `level` interval, against a
    target percent: "within" when the whole interval is at or below the target, "above" when all of
    it is above, "undecided" otherwise (more seeds would tell)."""
    if not ms["mean"]:     # no relative spread of a zero mean (and no Infinity in compare.json)
        return {"percent": None, "low": None, "high": None, "target": target, "verdict": "undefined"}
    lo, hi = std_interval(n, level)
    rel = 100 * ms["std"] / ms["mean"]
    verdict = "within" if rel * hi <= target else "above" if rel * lo > target else "undecided"
    return {"percent": round(rel, 2), "low": round(rel * lo, 2), "high": round(rel * hi, 2), "target": target,
            "verdict": verdict}


def _mean_std(xs, digits=2):
    # sample standard deviation (n − 1); 0 for a single seed
    return {"mean": round(statistics.fmean(xs), digits),
            "std": round(statistics.stdev(xs), digits) if len(xs) > 1 else 0.0}


def _paired(runs, base, key, digits=2):
    """Mean ± std over seeds of the per-seed difference run[key] − base[key] (same seed, same data)."""
    return _mean_std([r[key] - b[key] for r, b in zip(runs, base)], digits)


def ata_by_task(res):
    """What ATA's neighbours were, by task, in one run: {task t: {task u: the share of t's clients'
    Top-M neighbours, over every round with an ATA record, that hold task u}}; {} without ATA.
    The same-task share says whether ATA finds a client's partner; this says who fills the rest."""
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
    """results: {method: [results.json dict per seed]} -> compare.json's content."""
    methods = {}
    base = results.get("local")
    for m, runs in results.items():
        tasks = list(runs[0]["per_task"])
        n_rounds = len(runs[0]["rounds"])
        ata = [rd["same_task_mean"] for r in runs for rd in r.get("ata", [])]
        other = [rd["other_task_weight_mean"] for r in runs for rd in r.get("ata", []) if "other_task_weight_mean" in rd]
        per_task = {t: _mean_std([r["per_task"][t] for r in runs]) for t in tasks}
        average = _mean_std([r["average"] for r in runs])
        methods[m] = {
            "per_task": per_task,
            "average": average,
            "average_per_seed": [r["average"] for r in runs],
            # the spread targets, read with a 90% interval (spread_check); None for one seed
            "spread_check": {c: spread_check(ms, len(runs), SPREAD_TARGETS["average" if c == "average" else "task"])
                             for c, ms in {**per_task, "average": average}.items()} if len(runs) > 1 else None,
            "per_task_ce": {t: _mean_std([r["per_task_ce"][t] for r in runs], 4) for t in tasks},
            "average_ce": _mean_std([r["average_ce"] for r in runs], 4),
            "vs_local": _paired(runs, base, "average") if base else None,
            "ce_vs_local": _paired(runs, base, "average_ce", 4) if base else None,
            # what ATA did: the share of a client's neighbours that hold its own task, over rounds and seeds
            "ata_same_task": round(sum(ata) / len(ata), 3) if ata else None,
            # and, per seed, which tasks a task's clients took as neighbours (ata_by_task)
            "ata_by_task": [ata_by_task(r) for r in runs] if ata else None,
            # how much of a client's personalised Θ̄^l came from clients of other tasks (ATA's weights)
            "ata_other_task_weight": round(sum(other) / len(other), 3) if other else None,
            "rounds": [{"round": runs[0]["rounds"][i]["round"],
                        "average": _mean_std([r["rounds"][i]["average"] for r in runs])
                        if "average" in runs[0]["rounds"][i] else None,
                        "average_ce": _mean_std([r["rounds"][i]["average_ce"] for r in runs], 4)
                        if "average_ce" in runs[0]["rounds"][i] else None} for i in range(n_rounds)],
            "bytes_up_per_round": runs[0]["bytes_up"] // max(1, len_rounds(runs[0])),
            "bytes_down_per_round": runs[0]["bytes_down"] // max(1, len_rounds(runs[0])),
            "trainable_params": runs[0]["trainable_params"],
            "communicated_params": runs[0]["communicated_params"],
            "wall_s": round(sum(r["wall_s"] for r in runs), 1),
        }
    # None: every seed drew its own data; a number: the data drawn once with it (--data-seed)
    data_seed = next(iter(results.values()))[0].get("config", {}).get("data_seed")
    return {"scenario": scenario, "seeds": list(seeds), "data_seed": data_seed, "methods": methods}


def spread_sources(out: Path, seeds, methods):
    """How much of each score's spread over seeds the test set's size accounts for, from the runs'
    predictions files (each prediction's score): {method: {task or "average": {"std", "test_set_std",
    "test_set_share"}}}.

    A task's score at seed s is the mean over its clients of their mean item score. Its variance
    over seeds splits into the items' own variances, sum_c sum_i var_s(x_ci) / (C n_c)^2, which
    falls as 1/n with more test samples, and the covariance between items (a seed's model better
    or worse on many items at once), which more test samples do not reduce. test_set_std is the
    first part's square root and test_set_share its fraction of the variance: an estimate from few
    seeds, so it can exceed 1. The average over tasks adds up its tasks' parts over T^2."""
    found = {}
    for m in methods:
        per_seed = []
        for s in seeds:
            run = Path(out) / f"{m}-seed{s}"
            res = json.loads((run / "results.json").read_text())
            by_task = {}
            for c in res["clients"]:
                f = run / f"predictions_client_{c['id']}.jsonl"
                rows = [json.loads(x) for x in f.read_text().splitlines()]
                if any("score" not in r for r in rows):
                    raise ValueError(f"{f}: a prediction without its score (written before scores were recorded)")
                by_task.setdefault(c["task"], []).append([r["score"] for r in rows])
            per_seed.append(by_task)
        parts, avg_seed, avg_items = {}, [0.0] * len(seeds), 0.0
        tasks = list(per_seed[0])
        for t in tasks:
            clients = per_seed[0][t]
            score = [statistics.fmean(statistics.fmean(x) for x in run[t]) for run in per_seed]
            items = sum(statistics.variance([run[t][c][i] for run in per_seed]) / (len(clients) * len(x)) ** 2
                        for c, x in enumerate(clients) for i in range(len(x)))
            parts[t] = _split(score, items)
            avg_seed = [a + v / len(tasks) for a, v in zip(avg_seed, score)]
            avg_items += items / len(tasks) ** 2
        parts["average"] = _split(avg_seed, avg_items)
        found[m] = parts
    return found


def _split(per_seed, items):
    var = statistics.variance(per_seed)
    return {"std": round(var ** 0.5, 2), "test_set_std": round(items ** 0.5, 2),
            "test_set_share": round(items / var, 2) if var > 0 else None}


def len_rounds(res):
    c = res["config"]
    return c["rounds_stage1"] + c["rounds_stage2"]


def markdown(summary):
    """Tables, methods as rows, 'mean ± std' over seeds: scores (tasks, average, paired difference to
    Local; the best mean of each column in bold), their spreads against the targets (spread_check),
    the smooth figures beside them (test loss, its paired difference to Local, ATA's same-task
    share, communication, sizes), then what ATA's neighbours were and where a spread comes from."""
    methods = summary["methods"]
    tasks = list(next(iter(methods.values()))["per_task"])
    cols = tasks + ["average"]
    cell = lambda m, c: methods[m]["average"] if c == "average" else methods[m]["per_task"][c]
    best = {c: max(cell(m, c)["mean"] for m in methods) for c in cols}
    pm = lambda v, f=".1f": "–" if v is None else f"{v['mean']:+{f}} ± {v['std']:{f}}"
    held = "" if summary.get("data_seed") is None else f", the data drawn once with seed {summary['data_seed']}"
    lines = [f"Scenario {summary['scenario']}, seeds {', '.join(map(str, summary['seeds']))}{held} (mean ± std over "
             "seeds; Δ: the per-seed difference to Local, mean ± std)", "",
             "| method | " + " | ".join(cols) + " | Δ average vs local |", "|---" * (len(cols) + 2) + "|"]
    for m in methods:
        cells = []
        for c in cols:
            v = cell(m, c)
            txt = f"{v['mean']:.1f} ± {v['std']:.1f}"
            cells.append(f"**{txt}**" if v["mean"] == best[c] else txt)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {pm(methods[m]['vs_local'])} |")
    checks = {m: k["spread_check"] for m, k in methods.items() if k.get("spread_check")}
    if checks:
        lo, hi = std_interval(len(summary["seeds"]))
        lines += ["", f"The spread targets (std over seeds ≤ {SPREAD_TARGETS['average']:g}% of the mean for the average, "
                  f"≤ {SPREAD_TARGETS['task']:g}% for each task): the std in % of the mean and its 90% interval "
                  f"([{lo:.2f}, {hi:.2f}] x the std for {len(summary['seeds'])} seeds); ✓ the interval is within the "
                  "target, ✗ above it, ? undecided", "",
                  "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        mark = {"within": "✓", "above": "✗", "undecided": "?"}
        cell = lambda ch: "– (mean 0)" if ch["percent"] is None else \
            f"{ch['percent']:.1f} [{ch['low']:.1f}, {ch['high']:.1f}] {mark[ch['verdict']]}"
        for m, ch in checks.items():
            lines.append(f"| {m} | " + " | ".join(cell(ch[c]) for c in cols) + " |")
    lines += ["", "| method | test loss | Δ test loss vs local | ATA neighbours of the own task | kB up / round | "
              "kB down / round | trainable params | communicated params |", "|---" * 8 + "|"]
    for m, k in methods.items():
        ce, ata = k["average_ce"], k["ata_same_task"]
        lines.append(f"| {m} | {ce['mean']:.3f} ± {ce['std']:.3f} | {pm(k['ce_vs_local'], '.3f')} | "
                     f"{'–' if ata is None else f'{ata:.2f}'} | "
                     f"{k['bytes_up_per_round'] / 1e3:,.0f} | {k['bytes_down_per_round'] / 1e3:,.0f}"
                     f" | {k['trainable_params']:,} | {k['communicated_params']:,} |")
    with_ata = {m: k["ata_by_task"] for m, k in methods.items() if any(k.get("ata_by_task") or [])}
    if with_ata:
        lines += ["", "ATA's neighbours by task: the share of a task's clients' Top-M neighbours, over all rounds, "
                  "that hold each task (one figure per seed)", "", "| method | clients of | neighbours holding |",
                  "|---|---|---|"]
        for m, per_seed in with_ata.items():
            for t in per_seed[0]:
                shares = "; ".join(f"{u} " + " / ".join(f"{s[t][u]:.2f}" for s in per_seed) for u in per_seed[0][t])
                lines.append(f"| {m} | {t} | {shares} |")
        weights = {m: k["ata_other_task_weight"] for m, k in methods.items() if k.get("ata_other_task_weight") is not None}
        if weights:
            lines += ["", "Of a client's personalised text adapter Θ̄^l, the share that came from clients of other tasks "
                      "(ATA's weights, mean over clients, rounds and seeds): "
                      + ", ".join(f"{m} {w:.2f}" for m, w in weights.items())]
    sources = summary.get("spread_sources")
    if sources:
        lines += ["", "Where the spread over seeds comes from: each score's std over seeds, and in brackets the part "
                  "that the test set's size accounts for (its items' own variance, which falls as 1/n with more test "
                  "samples; the rest is the training's: compare.spread_sources)", "",
                  "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for m, parts in sources.items():
            lines.append(f"| {m} | " + " | ".join(f"{parts[c]['std']:.1f} ({parts[c]['test_set_std']:.1f})"
                                                  for c in cols) + " |")
    return "\n".join(lines)


def write(summary, out: Path, log=print):
    """compare.json, compare.md and the plots in out."""
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    (out / "compare.md").write_text(table + "\n")
    log("\n" + table)
    log(plots(summary, out))


def load(out: Path, order=()):
    """The runs of a comparison directory: (seeds, {method: [results.json per seed]}) from its
    <method>-seed<s>/results.json, methods in `order` first; every method must have every seed."""
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
    methods = sorted(found, key=lambda m: (list(order).index(m) if m in order else len(order), m))
    return seeds, {m: [found[m][s] for s in seeds] for m in methods}


def plots(summary, out: Path) -> str:
    """compare.png (per-task score by method, error bars = std over seeds) and rounds.png (average
    score after each round). Returns a one-line report."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plots (pip install matplotlib); tables written"
    methods = summary["methods"]
    tasks = list(next(iter(methods.values()))["per_task"]) + ["average"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks) * len(methods) / 4), 4.5))
    width = 0.8 / len(methods)
    for i, (m, v) in enumerate(methods.items()):
        vals = [v["per_task"][t] if t != "average" else v["average"] for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], [x["mean"] for x in vals], width,
               yerr=[x["std"] for x in vals], capsize=2, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("score (CIDEr-D x100, accuracy %)")
    ax.set_title(f"Scenario {summary['scenario']}: per-task score by method, seeds {summary['seeds']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, v in methods.items():
        rs = [r for r in v["rounds"] if r["average"]]
        ax.errorbar([r["round"] for r in rs], [r["average"]["mean"] for r in rs], yerr=[r["average"]["std"] for r in rs],
                    marker="o", capsize=2, label=m)
    ax.set_xticks([r["round"] for r in next(iter(methods.values()))["rounds"]])
    ax.set_xlabel("round")
    ax.set_ylabel("average score over tasks")
    ax.set_title(f"Scenario {summary['scenario']}: average score after each round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)
    return f"wrote {out}/compare.png, {out}/rounds.png"


if __name__ == "__main__":
    from run import METHODS    # their order in the tables
    for d in sys.argv[1:] or ["runs/compare-A"]:
        seeds, results = load(Path(d), list(METHODS))
        summary = summarise(next(iter(results.values()))[0]["scenario"], seeds, results)
        summary["spread_sources"] = spread_sources(Path(d), seeds, results) if len(seeds) > 1 else None
        write(summary, Path(d))
        print(f"wrote {d}/compare.json, compare.md")
