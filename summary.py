"""
What a comparison says: pure functions from runs' results.json to figures and verdicts, no running
and no files (compare.py runs the comparisons and writes what these return).

    summarise(scenario, draws)   {draw: (seeds, {label: [results.json per seed]})} -> compare.json's content

Per draw of the world (a --data-seed) and method: mean ± std over the training seeds of each task's
score, of the scale-free average and of the CIDEr-weighted one, and paired differences (the same
seed, the same data) to Local and, for the ablations, to Pilot. Across draws: the room split (what
pooling a task's own data gives, what the other tasks' data add, and how much of the latter each
federated method reaches), the bounds against the benchmark's calibration targets, and the paper's
claims, each decided by RULE on every measure.
"""
import functools
import math
import statistics

BOUNDS = ("local", "centralized-task", "centralized")   # the benchmark's own noise: spread targets apply to these
SPREAD_TARGETS = {"average": 3.0, "task": 10.0}          # std over seeds in % of the mean
ROOM_TARGET = 1.15            # Centralized's CIDEr-weighted average over Local's
LEARNABLE = 50.0              # Centralized's score on every accuracy task
FEDERATED = ("fedavg", "fedprox", "fedavg-task", "pilot", "pilot-no-stage1", "pilot-no-ctmoa", "pilot-no-ata",
             "pilot-no-client-s2")
# The paper's claims, each a paired difference: (claim, method, baseline).
CLAIMS = [("Pilot above FedAvg-style FedIT", "pilot", "fedavg"),
          ("Pilot above Local", "pilot", "local"),
          ("knowledge from other tasks helps", "pilot", "fedavg-task"),
          ("stage 1's task / client split helps", "pilot", "pilot-no-stage1"),
          ("CT-MoA helps", "pilot", "pilot-no-ctmoa"),
          ("ATA helps over averaging the text adapters", "pilot", "pilot-no-ata"),
          ("the client adapter in stage 2 helps", "pilot", "pilot-no-client-s2")]
ALPHA = 0.05
RULE = ("On each draw of the world, each claim's paired difference over the training seeds gets a two-sided "
        "Student's t test; the p-values of the claims are Holm-corrected within each draw and measure. A claim "
        f"holds (does not hold) on a measure when on every draw its corrected p-value is below {ALPHA:g} and its "
        "mean difference is above (below) 0; otherwise it is undecided, whatever its sign. The seeds carry the "
        "training's spread, the draws the data's: a verdict must survive both, and the correction the number "
        "of claims.")
NORMALISED = "% of Local"          # the scale-free average's name in the tables
WEIGHTED = "CIDEr-weighted"        # the plain average over tasks, in which CIDEr-D (about 300) outweighs the rest


# ----------------------------------------------------------------------------- statistics
def mean_std(xs, digits=2):
    # sample standard deviation (n − 1); 0 for a single seed
    return {"mean": round(statistics.fmean(xs), digits), "std": round(statistics.stdev(xs), digits) if len(xs) > 1 else 0.0}


def _t_density(df):
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)


def t_cdf(x, df, n=2000):
    """P(T <= x) for Student's t with df degrees of freedom (Simpson's rule on the density from 0;
    beyond |x| = 60 the tail integral is taken from 60, where it is below 1e-6 for df >= 2)."""
    if x < 0:
        return 1 - t_cdf(-x, df, n)
    density = _t_density(df)
    x = min(x, 1e4)
    h = x / n
    return min(1.0, 0.5 + h / 3 * sum(density(i * h) * (1 if i in (0, n) else 4 if i % 2 else 2) for i in range(n + 1)))


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """Student's t quantile, by bisection on its CDF."""
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_test(d):
    """Two-sided p-value of a paired t test that the mean of the differences d is 0 (1 with one seed)."""
    if len(d) < 2:
        return 1.0
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        return 0.0 if mean else 1.0
    t = abs(mean) / (sd / math.sqrt(len(d)))
    return max(0.0, 2 * (1 - t_cdf(t, len(d) - 1, n=20000 if t > 20 else 2000)))


def holm(pvalues):
    """Holm's step-down adjustment: adjusted p-values in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def paired(d, digits=2):
    """A per-seed difference d: mean ± std, its 90% interval (Student's t over the seeds), the seeds
    on the mean's side of 0, its two-sided p-value, and "above" / "below" when the 90% interval
    excludes 0, else "undecided"."""
    mean = statistics.fmean(d)
    out = {**mean_std(d, digits), "low": None, "high": None, "per_seed": [round(x, digits) for x in d],
           "same_sign": sum((x > 0) == (mean > 0) and x != 0 for x in d), "seeds": len(d), "verdict": "undecided",
           "p": t_test(d)}
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


# ----------------------------------------------------------------------------- measures of a run
def tasks_of(results):
    return list(next(iter(results.values()))[0]["per_task"])


def local_scale(results):
    """Local's mean score per task over the draw's seeds: the scale of the normalised measure (None
    without Local, or when Local scores 0 on a task: no scale to read a score against)."""
    runs = results.get("local")
    scale = runs and {t: statistics.fmean(r["per_task"][t] for r in runs) for t in runs[0]["per_task"]}
    return scale if scale and all(v > 0 for v in scale.values()) else None


def measures(res, scale):
    """A run's measures: each task's score; NORMALISED, the mean over tasks of the score in % of
    Local's on that task (each task weighs the same, a point counts as its share of Local's score);
    WEIGHTED, the plain mean over tasks (results.json's "average")."""
    out = dict(res["per_task"])
    if scale:
        out[NORMALISED] = 100 * statistics.fmean(res["per_task"][t] / scale[t] for t in scale)
    out[WEIGHTED] = res["average"]
    return out


def measure_names(tasks, scaled=True):
    return ([NORMALISED] if scaled else []) + list(tasks) + [WEIGHTED]


# ----------------------------------------------------------------------------- one draw
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


def _rounds(res):
    c = res["config"]
    return max(1, c["rounds_stage1"] + c["rounds_stage2"])


def summarise_draw(seeds, results):
    """results: {label: [results.json per seed]} of one draw -> per method: its figures, its paired
    differences to Local (and an ablation's or another M's to Pilot), its spread, ATA's record,
    its costs."""
    scale, has_local = local_scale(results), "local" in results
    tasks = tasks_of(results)
    names = measure_names(tasks, scale is not None)
    values = {m: [measures(r, scale) for r in runs] for m, runs in results.items()}
    vs = lambda m, b: {k: paired([x[k] - y[k] for x, y in zip(values[m], values[b])]) for k in names}
    out = {}
    for m, runs in results.items():
        ms = {k: mean_std([v[k] for v in values[m]]) for k in names}
        ata = [rd for r in runs for rd in r.get("ata", [])]
        ablation = "pilot" in results and m.startswith("pilot") and m != "pilot"
        out[m] = {
            "measures": ms, "per_seed": {k: [round(v[k], 2) for v in values[m]] for k in names},
            "per_task_ce": {t: mean_std([r["per_task_ce"][t] for r in runs], 4) for t in tasks},
            "average_ce": mean_std([r["average_ce"] for r in runs], 4),
            "vs_local": vs(m, "local") if has_local else None,
            "ce_vs_local": paired([r["average_ce"] - b["average_ce"] for r, b in zip(runs, results["local"])], 4)
            if has_local else None,
            "vs_pilot": vs(m, "pilot") if ablation else None,
            "ce_vs_pilot": paired([r["average_ce"] - b["average_ce"] for r, b in zip(runs, results["pilot"])], 4)
            if ablation else None,
            "spread": {k: spread(ms[k], len(runs), SPREAD_TARGETS["task" if k in tasks else "average"]
                                 if m in BOUNDS else None) for k in [*tasks, WEIGHTED]} if len(runs) > 1 else None,
            "ata_same_task": round(statistics.fmean(rd["same_task_mean"] for rd in ata), 3) if ata else None,
            "ata_other_task_weight": round(statistics.fmean(rd["other_task_weight_mean"] for rd in ata), 3) if ata else None,
            "ata_by_task": [ata_by_task(r) for r in runs] if ata else None,
            "rounds": [{"round": rd["round"], "average_ce": mean_std([r["rounds"][i]["average_ce"] for r in runs], 4)}
                       for i, rd in enumerate(runs[0]["rounds"]) if "average_ce" in rd],
            "kb_up_per_round": runs[0]["bytes_up"] / 1e3 / _rounds(runs[0]),
            "kb_down_per_round": runs[0]["bytes_down"] / 1e3 / _rounds(runs[0]),
            "trainable_params": runs[0]["trainable_params"], "communicated_params": runs[0]["communicated_params"],
            "rounds_stage1": runs[0]["config"]["rounds_stage1"], "wall_s": round(sum(r["wall_s"] for r in runs), 1),
        }
    return {"seeds": list(seeds), "tasks": tasks, "measures": names, "methods": out}


# ----------------------------------------------------------------------------- across draws
def decide(draws, names, alpha=ALPHA):
    """The claims' verdicts by RULE. draws: {draw: summarise_draw's content with "values"}. Returns one
    entry per claim whose two methods every draw has, with per measure each draw's paired difference
    and Holm-corrected p-value, and the verdict."""
    present = [c for c in CLAIMS if all(c[1] in d["values"] and c[2] in d["values"] for d in draws.values())]
    out = [{"claim": c, "method": m, "baseline": b, "measures": {}} for c, m, b in present]
    for k in names:
        per_draw = {}
        for draw, d in draws.items():
            diffs = [paired([x[k] - y[k] for x, y in zip(d["values"][m], d["values"][b])]) for _, m, b in present]
            for dd, adj in zip(diffs, holm([dd["p"] for dd in diffs])):
                dd["p_holm"] = adj
            per_draw[draw] = diffs
        for i, entry in enumerate(out):
            got = {draw: per_draw[draw][i] for draw in draws}
            sig = all(g["p_holm"] < alpha for g in got.values())
            up, down = all(g["mean"] > 0 for g in got.values()), all(g["mean"] < 0 for g in got.values())
            entry["measures"][k] = {"draws": got, "mean": round(statistics.fmean(g["mean"] for g in got.values()), 2),
                                    "verdict": "holds" if sig and up else "does not hold" if sig and down else "undecided"}
    return out


def rooms(draws, tasks):
    """Per draw and task: the within-task room (centralized-task − Local) and the cross-task room
    (Centralized − centralized-task), paired over seeds, and the share of the cross-task room each
    federated method reaches, (method − centralized-task) / (Centralized − centralized-task) on the
    draw's means; None where the cross-task room is not above 0 at 90% (nothing to reach)."""
    out = {}
    for draw, d in draws.items():
        v = d["values"]
        if not all(b in v for b in BOUNDS):
            continue
        row = {}
        for t in tasks:
            col = lambda m: [x[t] for x in v[m]]
            within = paired([a - b for a, b in zip(col("centralized-task"), col("local"))])
            cross = paired([a - b for a, b in zip(col("centralized"), col("centralized-task"))])
            base, room = statistics.fmean(col("centralized-task")), statistics.fmean(col("centralized")) - \
                statistics.fmean(col("centralized-task"))
            share = {m: round((statistics.fmean(col(m)) - base) / room, 3) if cross["verdict"] == "above" else None
                     for m in FEDERATED if m in v}
            row[t] = {"within": within, "cross": cross, "share": share}
        out[draw] = row
    return out


def bounds_check(draws, tasks):
    """Per draw: the benchmark's calibration targets read on the bounds. Room: Centralized's
    CIDEr-weighted average over Local's (target ROOM_TARGET); learnable: Centralized's mean on every
    accuracy task (target LEARNABLE) and its CIDEr-D above Local's; the bounds' spreads (targets
    SPREAD_TARGETS: within, above, or undecided on these seeds)."""
    out = {}
    for draw, d in draws.items():
        ms = d["methods"]
        if "local" not in ms or "centralized" not in ms:
            continue
        mean = lambda m, k: ms[m]["measures"][k]["mean"]
        room = mean("centralized", WEIGHTED) / mean("local", WEIGHTED)
        learn = {t: mean("centralized", t) for t in tasks}
        ok_learn = all(v >= LEARNABLE for t, v in learn.items() if t != "caption") and \
            ("caption" not in learn or learn["caption"] > mean("local", "caption"))
        spreads = {m: ms[m]["spread"] for m in BOUNDS if m in ms and ms[m]["spread"]}
        out[draw] = {"room": round(room, 4), "room_met": room >= ROOM_TARGET, "centralized": learn,
                     "learnable_met": ok_learn, "spreads_above": sorted(f"{m} {k}" for m, s in spreads.items()
                                                                        for k, x in s.items() if x and x.get("verdict") == "above")}
    return out


def summarise(scenario, draws):
    """draws: {draw: (seeds, {label: [results.json per seed]})} -> compare.json's content."""
    per_draw, with_values = {}, {}
    for draw, (seeds, results) in sorted(draws.items()):
        s = summarise_draw(seeds, results)
        per_draw[draw] = s
        with_values[draw] = {**s, "values": {m: [measures(r, local_scale(results)) for r in runs]
                                             for m, runs in results.items()}}
    first = per_draw[min(per_draw)]
    # the claims read the measures every draw has (without Local's scale on some draw: no % of Local)
    names = [k for k in first["measures"] if all(k in d["measures"] for d in per_draw.values())]
    return {"scenario": scenario, "draws": per_draw, "measures": names, "rule": RULE,
            "claims": decide(with_values, names),
            "rooms": rooms(with_values, first["tasks"]), "bounds": bounds_check(per_draw, first["tasks"])}
