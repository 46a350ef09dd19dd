"""
Comparisons: every method for every training seed on every draw of the world, then what a reader of
the paper needs from them (summary.py): each method's figures per task and on a scale-free average,
the room split between pooling a task's own data and the other tasks', and a verdict per claim that
must hold on every draw.

    python compare.py --scenario A --methods all --data-seeds 0,1,2 --jobs 2   # runs/compare-A, seeds 0-4
    python compare.py --scenario A --methods pilot --top-m 1 --jobs 2          # pilot-top1 beside them (draw 0)
    python compare.py runs/compare-A                                           # the summaries again, from the runs
    python compare.py runs/compare-A runs/compare-B --into RESULTS.md README.md --figures docs/figures

A comparison directory holds one run per draw, method and seed (draw<d>/<label>-seed<s>, a run.py
output). Started again, a comparison keeps its complete runs and resumes a half-done run from its
checkpoint. Its summary (compare.json, compare.md, and draw<d>/scores.png, rounds.png) covers every
run in it. Any run.py flag is a comparison flag (--help). matplotlib is optional: without it the
plots are skipped, with one line saying so.
"""
import argparse
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import checkpoint
import run
import summary as sm
from config import METHODS
from config import with_defaults
from federation import resume_differences

SEEDS = [0, 1, 2, 3, 4]                   # a comparison's training seeds unless --seeds is given
ROUND_CURVES = ("local", "centralized", "fedavg", "fedavg-task", "pilot")


# ----------------------------------------------------------------------------- running
def plan(cfg, methods, seeds, draws):
    """Every run of a comparison: cfg for each draw, method and seed, in <out>/draw<d>/<label>-seed<s>
    (the label is the method, with -top<M> when --top-m is given), each with the test loss after every
    round."""
    out = Path(cfg.out or f"runs/compare-{cfg.scenario}")
    label = (lambda m: m) if cfg.top_m is None else (lambda m: f"{m}-top{cfg.top_m}")
    return [replace(cfg, method=m, seed=s, data_seed=d, out=str(out / f"draw{d}" / f"{label(m)}-seed{s}"),
                    test_loss_every_round=True) for d in draws for m in methods for s in seeds]


def state_of(cfg):
    """'done' (results.json written by a run of these settings), 'resume' (a checkpoint of these
    settings), or 'start'. A directory holding another run's output is an error, not overwritten."""
    out = Path(cfg.out)
    try:
        res = json.loads((out / "results.json").read_text())
        saved = res["config"]
    except (OSError, ValueError, KeyError, TypeError):
        res = None
    if res is None:
        try:
            saved = checkpoint.read_meta(out)["config"]
        except checkpoint.CheckpointError:
            return "start"
    differ = resume_differences(saved, with_defaults(cfg, log=lambda *a: None))
    if differ:
        raise ValueError(f"{out}: holds a run of other settings ({', '.join(differ)}); move it away or pick another --out")
    return "done" if res is not None else "resume"


def run_comparison(cfg, methods, seeds, jobs=1, log=print, threads=None, draws=(0,)):
    """Every run of plan(...) not yet complete: complete runs are kept, a half-done run continues from
    its checkpoint (--resume), the rest start. jobs > 1 runs that many at once, each in its own process
    with `threads` threads (default: the threads torch would use, divided by jobs), its log appended to
    <run>/run.log. A run's results do not depend on how many runs share the machine. Then the
    summaries of every run in the comparison's directory."""
    t0 = time.time()
    cfgs = plan(cfg, methods, seeds, draws)
    states = [state_of(c) for c in cfgs]
    todo = [replace(c, resume=s == "resume") for c, s in zip(cfgs, states) if s != "done"]
    log(f"{len(cfgs)} runs: {states.count('done')} complete, kept; {states.count('resume')} to resume; "
        f"{states.count('start')} to start")
    if jobs > 1:
        _run_side_by_side(todo, jobs, threads, log)
    else:
        for c in todo:
            run.run(c, log=log)
    summary = write(Path(cfgs[0].out).parents[1], log)
    log(f"{len(todo)} runs in {time.time() - t0:.0f} s")
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
                name = "/".join(Path(futures[f].out).parts[-2:])
                log(f"{name}: average {res['average']:.2f}, test loss {res['average_ce']:.4f}, "
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
    with open(Path(cfg.out) / "run.log", "a") as f:
        return run.run(cfg, log=lambda *a: print(*a, file=f, flush=True))


# ----------------------------------------------------------------------------- reading the runs
def load(out: Path):
    """{draw: (seeds, {label: [results.json per seed]})} of a comparison directory's
    draw<d>/<label>-seed<s> runs, labels in METHODS' order first; within a draw every label must
    have every seed."""
    draws = {}
    for f in sorted(Path(out).glob("draw*/*-seed*/results.json")):
        d, m = re.fullmatch(r"draw(\d+)", f.parent.parent.name), re.fullmatch(r"(.+)-seed(\d+)", f.parent.name)
        if d and m:
            draws.setdefault(int(d[1]), {}).setdefault(m[1], {})[int(m[2])] = json.loads(f.read_text())
    if not draws:
        raise FileNotFoundError(f"{out}: no draw<d>/<method>-seed<s>/results.json")
    order = list(METHODS)
    out_ = {}
    for d, found in sorted(draws.items()):
        seeds = sorted({s for runs in found.values() for s in runs})
        for m, runs in found.items():
            if sorted(runs) != seeds:
                raise ValueError(f"{out}/draw{d}: {m} lacks seeds {sorted(set(seeds) - set(runs))} that another method has")
        labels = sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m))
        out_[d] = (seeds, {m: [found[m][s] for s in seeds] for m in labels})
    return out_


# ----------------------------------------------------------------------------- tables
def _pm(v, f=".1f"):
    return "–" if v is None else f"{v['mean']:{f}} ± {v['std']:{f}}"


def _diff(v, f=".1f"):
    return "–" if v is None else f"{v['mean']:+{f}} ± {v['std']:{f}} ({v['same_sign']}/{v['seeds']})"


def _head(cols):
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def draw_sections(scenario, draw, s):
    """One draw's tables, by name: results, ablations, spreads, ata, costs."""
    ms, seeds, tasks, names = s["methods"], s["seeds"], s["tasks"], s["measures"]
    best = {k: max(v["measures"][k]["mean"] for v in ms.values()) for k in names}
    cell = lambda v, k: (lambda t: f"**{t}**" if v["measures"][k]["mean"] == best[k] else t)(_pm(v["measures"][k]))
    vs_local = next(iter(ms.values()))["vs_local"] is not None
    key = sm.NORMALISED if sm.NORMALISED in names else sm.WEIGHTED     # the Δ column's measure
    out = {}
    lines = [f"Scenario {scenario}, draw {draw} of the world (--data-seed {draw}), seeds {', '.join(map(str, seeds))}: mean "
             f"± std over seeds. {sm.NORMALISED}: the mean over tasks of each task's score in % of Local's mean on it; "
             f"{sm.WEIGHTED}: the plain mean over tasks, where CIDEr-D outweighs the accuracies; Δ: the paired difference "
             f"to Local (per seed, then mean ± std; in brackets the seeds of {len(seeds)} on its side of 0); test loss: "
             "mean answer-token cross-entropy on the test sets", "",
             *_head(["method", *names] + ([f"Δ {key} vs local"] if vs_local else []) +
                    ["test loss"] + (["Δ test loss vs local"] if vs_local else []))]
    for m, v in ms.items():
        lines.append(f"| {m} | " + " | ".join(cell(v, k) for k in names) + " | "
                     + (f"{_diff(v['vs_local'][key])} | " if vs_local else "") + f"{_pm(v['average_ce'], '.3f')} |"
                     + (f" {_diff(v['ce_vs_local'], '.3f')} |" if vs_local else ""))
    out["results"] = "\n".join(lines)
    rows = {m: v for m, v in ms.items() if v["vs_pilot"]}
    if rows:
        lines = [f"Draw {draw}: what removing a part costs, or what another M does: the paired difference to Pilot "
                 f"(mean ± std over seeds; the seeds of {len(seeds)} on its side of 0)", "",
                 *_head(["method", *names, "test loss"])]
        for m, v in rows.items():
            lines.append(f"| {m} | " + " | ".join(_diff(v["vs_pilot"][k]) for k in names) + f" | {_diff(v['ce_vs_pilot'], '.3f')} |")
        out["ablations"] = "\n".join(lines)
    if next(iter(ms.values()))["spread"]:
        lo, hi = sm.std_interval(len(seeds))
        lines = [f"Draw {draw}: spread over seeds, the std in % of the mean with its 90% interval ([{lo:.2f}, {hi:.2f}] x "
                 f"for {len(seeds)} seeds). The bounds against the benchmark's targets (≤ {sm.SPREAD_TARGETS['average']:g}% "
                 f"on the {sm.WEIGHTED} average, ≤ {sm.SPREAD_TARGETS['task']:g}% per task): ✓ within, ✗ above, ? "
                 "undecided; a federated method's spread is a property of the method", "",
                 *_head(["method", *tasks, sm.WEIGHTED])]
        mark = {"within": " ✓", "above": " ✗", "undecided": " ?"}
        fmt = lambda x: "–" if x is None else f"{x['percent']:.1f} [{x['low']:.1f}, {x['high']:.1f}]{mark.get(x.get('verdict'), '')}"
        for m, v in ms.items():
            lines.append(f"| {m} | " + " | ".join(fmt(v["spread"][k]) for k in [*tasks, sm.WEIGHTED]) + " |")
        out["spreads"] = "\n".join(lines)
    with_ata = {m: v for m, v in ms.items() if v["ata_by_task"]}
    if with_ata:
        lines = [f"Draw {draw}: ATA's neighbourhoods, the share of a client's Top-M neighbours that hold its own task, "
                 "and of its personalised Θ̄^l that comes from clients of other tasks (mean over clients, rounds, "
                 "seeds); then, by task, which tasks fill the neighbourhoods (one figure per seed)", "",
                 *_head(["method", "own task among neighbours", "Θ̄^l from other tasks", "clients of → neighbours holding"])]
        for m, v in with_ata.items():
            by = "; ".join(f"{t} → " + ", ".join(f"{u} " + "/".join(f"{p[t][u]:.2f}" for p in v["ata_by_task"])
                                                  for u in v["ata_by_task"][0][t]) for t in v["ata_by_task"][0])
            lines.append(f"| {m} | {v['ata_same_task']:.2f} | {v['ata_other_task_weight']:.2f} | {by} |")
        out["ata"] = "\n".join(lines)
    lines = [f"Draw {draw}: per round, all clients together, kB uploaded and downloaded; per client, parameters trained "
             "and communicated; a run's wall time (mean over seeds)", "",
             *_head(["method", "kB up", "kB down", "trainable", "communicated", "s a run"])]
    for m, v in ms.items():
        lines.append(f"| {m} | {v['kb_up_per_round']:,.0f} | {v['kb_down_per_round']:,.0f} | {v['trainable_params']:,} | "
                     f"{v['communicated_params']:,} | {v['wall_s'] / len(seeds):.0f} |")
    out["costs"] = "\n".join(lines)
    return out


def sections(summary):
    """compare.md's tables, by name: verdicts, claims, rooms, bounds, then <table>-draw<d> per draw."""
    out, draws = {}, summary["draws"]
    names = summary["measures"]
    if summary["claims"]:
        lines = [f"The paper's claims, decided by the rule below on each measure; a cell gives the verdict and the mean "
                 f"paired difference over the draws {', '.join(map(str, draws))} ({sm.NORMALISED}: points of "
                 f"Local's score; {sm.WEIGHTED}: the plain mean over tasks, kept as what it is). {summary['rule']}", "",
                 *_head(["claim", *names])]
        for c in summary["claims"]:
            cells = [f"**{x['verdict']}** {x['mean']:+.1f}" if x["verdict"] != "undecided" else f"undecided {x['mean']:+.1f}"
                     for x in (c["measures"][k] for k in names)]
            lines.append(f"| {c['claim']} ({c['method']} − {c['baseline']}) | " + " | ".join(cells) + " |")
        out["verdicts"] = "\n".join(lines)
        lines = ["Each claim on each measure, draw by draw: the paired difference (mean ± std over seeds) and its "
                 "Holm-corrected p-value; the verdict needs every draw", "",
                 *_head(["claim", "measure", *[f"draw {d}" for d in draws], "verdict"])]
        for c in summary["claims"]:
            for k in names:
                x = c["measures"][k]
                per = [f"{g['mean']:+.1f} ± {g['std']:.1f} (p {g['p_holm']:.2g})" for g in x["draws"].values()]
                lines.append(f"| {c['method']} − {c['baseline']} | {k} | " + " | ".join(per) + f" | {x['verdict']} |")
        out["claims"] = "\n".join(lines)
    if summary["rooms"]:
        fed = [m for m in sm.FEDERATED if any(m in r[t]["share"] for r in summary["rooms"].values() for t in r)]
        lines = ["The room split per task and draw: within-task room, centralized-task − Local (pooling a task's own "
                 "clients); cross-task room, Centralized − centralized-task (what the other tasks' data add); both paired "
                 "over seeds, mean ± std, with their 90% intervals' verdict. Then the share of the cross-task room each "
                 "federated method reaches, (method − centralized-task) / (Centralized − centralized-task) on the draw's "
                 "means: 1 is Centralized, 0 is the within-task bound, below 0 below it; – where the cross-task room is "
                 "not above 0", "", *_head(["task", "draw", "within-task room", "cross-task room", *fed])]
        tasks = list(next(iter(summary["rooms"].values())))
        for t in tasks:
            for d, r in summary["rooms"].items():
                x = r[t]
                room = lambda v: f"{_pm(v)} {'(> 0)' if v['verdict'] == 'above' else '(< 0)' if v['verdict'] == 'below' else '(?)'}"
                share = lambda m: "–" if x["share"].get(m) is None else f"{x['share'][m]:.2f}"
                lines.append(f"| {t} | {d} | {room(x['within'])} | {room(x['cross'])} | " + " | ".join(share(m) for m in fed) + " |")
        out["rooms"] = "\n".join(lines)
        # the same split in one row per task, for README: each cell the draws' figures in order
        brief = [m for m in ("pilot", "fedavg-task", "fedavg") if m in fed]
        sign = {"above": ">", "below": "<"}
        lines = [f"The room split, one row per task, each cell draws {' / '.join(map(str, summary['rooms']))}: the mean "
                 "room (> or < 0 at 90%, ? undecided), then the share of the cross-task room a method reaches (– where "
                 "there is none)", "", *_head(["task", "within-task room", "cross-task room", *[f"{m}'s share" for m in brief]])]
        for t in tasks:
            rs = [r[t] for r in summary["rooms"].values()]
            room = lambda k: " / ".join(f"{x[k]['mean']:+.1f} {sign.get(x[k]['verdict'], '?')}" for x in rs)
            share = lambda m: " / ".join("–" if x["share"].get(m) is None else f"{x['share'][m]:.2f}" for x in rs)
            lines.append(f"| {t} | {room('within')} | {room('cross')} | " + " | ".join(share(m) for m in brief) + " |")
        out["rooms-brief"] = "\n".join(lines)
    if summary["bounds"]:
        tasks = list(next(iter(summary["bounds"].values()))["centralized"])
        lines = [f"The bounds on each draw against the benchmark's calibration targets: room, Centralized's {sm.WEIGHTED} "
                 f"average over Local's (≥ {sm.ROOM_TARGET:g}); learnable, Centralized ≥ {sm.LEARNABLE:g} on every "
                 "accuracy task and its CIDEr-D above Local's; the bounds' spreads above their targets at 90%", "",
                 *_head(["draw", "Local", "centralized-task", "Centralized", "room", *[f"Centralized {t}" for t in tasks],
                         "learnable", "spreads above target"])]
        for d, b in summary["bounds"].items():
            avg = lambda m: _pm(draws[d]["methods"][m]["measures"][sm.WEIGHTED]) if m in draws[d]["methods"] else "–"
            lines.append(f"| {d} | {avg('local')} | {avg('centralized-task')} | {avg('centralized')} | "
                         f"{b['room']:.3f} {'✓' if b['room_met'] else '✗'} | " + " | ".join(f"{b['centralized'][t]:.1f}"
                                                                                          for t in tasks)
                         + f" | {'✓' if b['learnable_met'] else '✗'} | {', '.join(b['spreads_above']) or 'none'} |")
        out["bounds"] = "\n".join(lines)
    for d, s in draws.items():
        out.update({f"{k}-draw{d}": v for k, v in draw_sections(summary["scenario"], d, s).items()})
    return out


# ----------------------------------------------------------------------------- plots
def plots(scenario, draw, s, out: Path) -> str:
    """scores.png: one panel per measure, each on its own scale, each method's mean (a bar) and every
    seed (a dot). rounds.png: the test loss after every round (mean over seeds, the band ± std) for
    the bounds, FedAvg, fedavg-task and Pilot, with the final scale-free score beside it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plots (pip install matplotlib); tables written"
    ms, names = s["methods"], s["measures"]
    title = {"caption": "captioning (CIDEr-D)", "vqa": "VQA (accuracy)", "grounding": "grounding (Acc@IoU≥0.5)",
             "ocr": "text reading (accuracy)", sm.NORMALISED: "average, % of Local", sm.WEIGHTED: "average, CIDEr-weighted"}
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 0.33 * len(ms) + 2.2), sharey=True)
    for ax, k in zip(axes, names):
        for i, (m, v) in enumerate(ms.items()):
            seeds = v["per_seed"][k]
            colour = "C0" if m.startswith("pilot") else "C2" if m in sm.BOUNDS else "C7"
            ax.barh(i, statistics.fmean(seeds), color=colour, alpha=0.5)
            ax.plot(seeds, [i] * len(seeds), "k.", ms=4)
        ax.set_title(title.get(k, k), fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(ms)), list(ms))
    axes[0].invert_yaxis()
    fig.suptitle(f"Scenario {scenario}, draw {draw}: mean over seeds {s['seeds']} (bar) and each seed (dot)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    curves = {m: v for m, v in ms.items() if m in ROUND_CURVES and len(v["rounds"]) > 1}
    if not curves:
        return f"wrote {out}/scores.png (no run has a round-by-round test loss)"
    key = sm.NORMALISED if sm.NORMALISED in names else sm.WEIGHTED
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    for i, (m, v) in enumerate(curves.items()):
        xs = [r["round"] for r in v["rounds"]]
        mean = [r["average_ce"]["mean"] for r in v["rounds"]]
        std = [r["average_ce"]["std"] for r in v["rounds"]]
        ax.plot(xs, mean, label=m, color=f"C{i}")
        ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], color=f"C{i}", alpha=0.2)
        bx.plot(v["per_seed"][key], [i] * len(v["per_seed"][key]), ".", color=f"C{i}")
        bx.plot([v["measures"][key]["mean"]], [i], "|", color=f"C{i}", ms=14)
    r1 = next(iter(curves.values()))["rounds_stage1"]
    ax.axvline(r1 + 0.5, color="grey", lw=0.8, ls=":")
    ax.text(r1 + 0.6, ax.get_ylim()[1], "stage 2 →", va="top", fontsize=8, color="grey")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("test loss (answer tokens, teacher-forced)")
    ax.legend(fontsize=8)
    ax.set_title(f"Scenario {scenario}, draw {draw}: test loss after each round (± std over seeds)", fontsize=10)
    bx.set_yticks(range(len(curves)), list(curves))
    bx.invert_yaxis()
    bx.set_title(f"final score, {title[key]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=110)
    plt.close(fig)
    return f"wrote {out}/scores.png, {out}/rounds.png"


# ----------------------------------------------------------------------------- writing
def write(out: Path, log=print):
    """compare.json, compare.md and each draw's plots, of every run in out; returns the summary."""
    draws = load(out)
    first = next(iter(next(iter(draws.values()))[1].values()))[0]
    summary = sm.summarise(first["scenario"], draws)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    parts = sections(summary)
    (out / "compare.md").write_text("\n\n".join(parts.values()) + "\n")
    log("\n" + "\n\n".join(parts.values()))
    for d, s in summary["draws"].items():
        log(plots(summary["scenario"], d, s, out / f"draw{d}"))
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
    if argv and not argv[0].startswith("-"):   # summarise comparisons (fill their tables into documents, copy plots)
        ap = argparse.ArgumentParser(description="Summarise comparisons again from their runs.")
        ap.add_argument("dirs", nargs="+", help="comparison directories (runs/compare-A ...)")
        ap.add_argument("--into", nargs="*", default=[], help="markdown files whose compare blocks to fill")
        ap.add_argument("--figures", help="a folder to copy each comparison's plots of its first draw to, as "
                                          "<scenario>-draw<d>-<plot>.png")
        a = ap.parse_args(argv)
        tables = {}
        for d in map(Path, a.dirs):
            summary = write(d)
            tables[summary["scenario"]] = sections(summary)
            for draw in [min(summary["draws"])] if a.figures else ():
                for name in ("scores", "rounds"):
                    if (d / f"draw{draw}" / f"{name}.png").is_file():
                        Path(a.figures).mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(d / f"draw{draw}" / f"{name}.png",
                                        Path(a.figures) / f"{summary['scenario']}-draw{draw}-{name}.png")
        for f in a.into:
            into(Path(f), tables)
            print(f"filled {f}")
        return
    ap = run.arg_parser("Run a comparison: every method for every seed and draw (any run.py flag applies to every run).")
    ap.add_argument("--methods", default="pilot", help="comma-separated methods, or 'all'")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated training seeds")
    ap.add_argument("--data-seeds", default="0", help="comma-separated draws of the world (each a --data-seed)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with its share of the threads")
    cfg, a = run.parse_config(argv, ap)
    methods = list(METHODS) if a.methods == "all" else a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: at least 1")
    if a.data_seed is not None:
        ap.error("--data-seed: a comparison takes --data-seeds (its draws)")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        run_comparison(cfg, methods, [int(s) for s in a.seeds.split(",")], a.jobs,
                       draws=[int(d) for d in a.data_seeds.split(",")])
    except ValueError as e:
        ap.exit(2, f"compare.py: error: {e}\n")


if __name__ == "__main__":
    main()
