"""
Each task's floor on the embedded benchmark: what one fixed answer, given to every test sample,
scores. A model that has learnt anything from the image must beat it; the benchmark's calibration
required both bounds (Local, Centralized) to, on every task (RESULTS.md).

    python tools/floors.py --scenario A                 # the benchmark's draw of the data
    python tools/floors.py --scenario B --data-seeds 0,1,2,3,4

Candidates: the 20 most frequent answers and, for grounding, every box of cells of a 4 x 4 grid;
chosen on the test set itself, so a floor is at least what a fixed answer chosen beforehand scores.
"""
import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import evaluate  # noqa: E402


def constant_answer(task, samples, top=20):
    """(answer, score) of the single answer that scores best on samples."""
    candidates = [a for a, _ in Counter(s.answer for s in samples).most_common(top)]
    if task == "grounding":
        v = [i / 4 for i in range(5)]
        candidates += [data.box_text([x1, y1, x2, y2]) for i, x1 in enumerate(v) for x2 in v[i + 1:]
                       for j, y1 in enumerate(v) for y2 in v[j + 1:]]
    score = lambda a: statistics.fmean(evaluate.item_scores(task, [a] * len(samples), samples))
    return max(((a, score(a)) for a in candidates), key=lambda t: t[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Each task's floor: what one fixed answer scores.")
    ap.add_argument("--scenario", default="A", choices=sorted(data.SCENARIOS))
    ap.add_argument("--data-seeds", default="0", help="comma-separated draws of the world (0: the benchmark's)")
    a = ap.parse_args(argv)
    floors = {}
    for seed in [int(s) for s in a.data_seeds.split(",")]:
        per_task = {}
        for c in data.make_scenario(a.scenario, seed):
            answer, value = constant_answer(c.task, c.test)
            print(f"data seed {seed}, client {c.id} ({c.task}): {value:.1f} answering {answer!r}")
            per_task.setdefault(c.task, []).append(value)
        for task, values in per_task.items():
            floors.setdefault(task, []).append(statistics.fmean(values))
    for task, v in floors.items():
        spread = f" ± {statistics.stdev(v):.1f} over {len(v)} draws" if len(v) > 1 else ""
        print(f"{task}: floor {statistics.fmean(v):.1f}{spread}")
    return floors


if __name__ == "__main__":
    main()
