"""Comparisons: the statistics on hand-computed cases, the scale-free measure, the room split, the
bounds against their targets, the verdict rule across draws, the tables and plots, and running:
side by side, and continued after an interruption."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import compare
import summary as sm
from config import Config

ROOT = Path(__file__).resolve().parents[1]


def _res(per_task, ce=1.0, ata=None, clients=None, rounds=None):
    """A results.json of one run, as compare.py reads it; per_task: {task: score}, or one VQA score."""
    per_task = per_task if isinstance(per_task, dict) else {"vqa": per_task}
    avg = sum(per_task.values()) / len(per_task)
    return {"per_task": per_task, "average": avg, "per_task_ce": {t: ce for t in per_task}, "average_ce": ce,
            "rounds": rounds or [{"round": 1, "average": avg, "average_ce": ce}], "bytes_up": 0, "bytes_down": 0,
            "trainable_params": 1, "communicated_params": 0, "wall_s": 1.0, "scenario": "A",
            "config": {"rounds_stage1": 1, "rounds_stage2": 0},
            "clients": clients or [{"id": i, "task": t} for i, t in enumerate(per_task)],
            "ata": [{"same_task_mean": a, "other_task_weight_mean": 0.0, "neighbours": {}} for a in ata or []]}


def _runs(**series):
    """{method: [results per seed]} from {method: [per_task dict or score per seed]}."""
    return {m.replace("_", "-"): [_res(x) for x in xs] for m, xs in series.items()}


# ----------------------------------------------------------------------------- statistics
def test_t_distribution_holm_and_chi_square_against_tables():
    for p, df, t in [(0.95, 4, 2.132), (0.95, 9, 1.833), (0.95, 2, 2.920), (0.975, 30, 2.042), (0.95, 1, 6.314)]:
        assert sm.t_quantile(p, df) == pytest.approx(t, abs=1e-3)
    # df 2 has a closed form: P(T <= t) = 1/2 + t / (2 sqrt(2 + t²)); differences 1, 2, 3: t = 2 sqrt(3)
    t = 2 * 3 ** 0.5
    assert sm.t_test([1, 2, 3]) == pytest.approx(2 * (0.5 - t / (2 * (2 + t * t) ** 0.5)), abs=1e-9)
    assert sm.t_test([1, 1, 1]) == 0.0 and sm.t_test([0, 0]) == 1.0 and sm.t_test([5]) == 1.0
    assert sm.t_test([10.0, 10.1, 9.9, 10.0, 10.05]) < 1e-7
    assert sm.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    lo, hi = sm.std_interval(10)          # sqrt(9 / 16.919), sqrt(9 / 3.325)
    assert (round(lo, 3), round(hi, 3)) == (0.729, 1.645)
    assert [round(x, 2) for x in sm.std_interval(5)] == [0.65, 2.37]


def test_a_draw_gives_each_measure_its_mean_std_and_paired_differences():
    # Local: caption 300, 310, 290 (scale 300), vqa 40, 50, 45 (scale 45); Pilot: caption 330, 300, 290,
    # vqa 45, 54, 45. % of Local: Pilot (1.1 + 1) / 2 = 105, (1 + 1.2) / 2 = 110, (0.9667 + 1) / 2 = 98.33;
    # Local 94.44, 107.22, 98.33: differences 10.56, 2.78, 0.0
    results = _runs(local=[{"caption": 300, "vqa": 40}, {"caption": 310, "vqa": 50}, {"caption": 290, "vqa": 45}],
                    pilot=[{"caption": 330, "vqa": 45}, {"caption": 300, "vqa": 54}, {"caption": 290, "vqa": 45}],
                    pilot_no_ata=[{"caption": 300, "vqa": 45}, {"caption": 300, "vqa": 50}, {"caption": 280, "vqa": 45}])
    s = sm.summarise_draw([0, 1, 2], results)
    assert s["measures"] == [sm.NORMALISED, "caption", "vqa", sm.WEIGHTED]
    p = s["methods"]["pilot"]
    assert p["per_seed"][sm.NORMALISED] == [105.0, 110.0, 98.33]
    v = p["vs_local"][sm.NORMALISED]
    assert v["per_seed"] == [10.56, 2.78, 0.0] and v["same_sign"] == 2 and v["mean"] == 4.44
    assert p["vs_local"][sm.WEIGHTED]["per_seed"] == [17.5, -3.0, 0.0]      # the CIDEr-weighted average
    assert p["measures"]["vqa"] == {"mean": 48.0, "std": 5.2}
    a = s["methods"]["pilot-no-ata"]["vs_pilot"]["caption"]
    assert a["per_seed"] == [-30, 0, -10] and s["methods"]["pilot"]["vs_pilot"] is None
    # the 90% interval: mean ± t(0.95, 2) std / sqrt(3)
    d = sm.paired([2, 1, 6])
    half = 2.919986 * 7 ** 0.5 / 3 ** 0.5
    assert (d["mean"], d["std"], d["low"], d["high"], d["verdict"]) == (3.0, 2.65, round(3 - half, 2), round(3 + half, 2),
                                                                         "undecided")


def test_spreads_are_read_against_the_targets_for_the_bounds_only():
    # 3 seeds: [sqrt(2 / 5.991), sqrt(2 / 0.1026)] x the std; vqa 10, 20, 30: 50% [28.9, 220.8]
    runs = [_res(10), _res(20), _res(30)]
    s = sm.summarise_draw([0, 1, 2], {"local": runs, "centralized-task": runs, "pilot": runs})
    assert s["methods"]["local"]["spread"]["vqa"]["verdict"] == "above"
    assert s["methods"]["centralized-task"]["spread"]["vqa"]["verdict"] == "above"
    assert "verdict" not in s["methods"]["pilot"]["spread"]["vqa"]      # a federated method's spread is a finding
    table = compare.draw_sections("A", 0, s)["spreads"]
    assert "| local | 50.0 [28.9, 220.8] ✗ | 50.0 [28.9, 220.8] ✗ |" in table and "| pilot | 50.0 [28.9, 220.8] |" in table
    assert sm.summarise_draw([0], {"local": [_res(99)]})["methods"]["local"]["spread"] is None


# ----------------------------------------------------------------------------- across draws
def _draw(pilot_minus_ata, pilot_minus_s2, shift=0.0):
    noise = [0.0, 0.3, -0.2, 0.1, -0.2]
    local = [40 + i + shift for i in range(5)]
    pilot = [x + 10 + e for x, e in zip(local, noise)]
    return [0, 1, 2, 3, 4], {
        "local": [_res(x) for x in local], "fedavg": [_res(x - 20 + e) for x, e in zip(local, reversed(noise))],
        "pilot": [_res(x) for x in pilot],
        "pilot-no-ata": [_res(x - d) for x, d in zip(pilot, pilot_minus_ata)],
        "pilot-no-client-s2": [_res(x - d) for x, d in zip(pilot, pilot_minus_s2)]}


def test_a_claim_holds_only_when_it_holds_on_every_draw_after_holms_correction():
    s = sm.summarise("A", {0: _draw([3, 2.9, 3.1, 3, 3.2], [-5, -5.1, -4.9, -5.2, -5]),
                           1: _draw([0.5, -0.4, 0.2, -0.3, 0.1], [-5, -4.8, -5.1, -5, -5.2], shift=3)})
    verdict = {c["baseline"]: c["measures"][sm.NORMALISED] for c in s["claims"]}
    assert set(verdict) == {"fedavg", "local", "pilot-no-ata", "pilot-no-client-s2"}     # claims whose runs exist
    assert verdict["fedavg"]["verdict"] == "holds" and verdict["local"]["verdict"] == "holds"
    ata = verdict["pilot-no-ata"]
    assert ata["verdict"] == "undecided" and ata["draws"][0]["p_holm"] < 0.05 < ata["draws"][1]["p_holm"]
    assert verdict["pilot-no-client-s2"]["verdict"] == "does not hold"
    # Holm within a draw and measure: four claims, the smallest p-value times 4, the next times 3, ...
    p = [verdict[b]["draws"][1]["p"] for b in ("fedavg", "local", "pilot-no-ata", "pilot-no-client-s2")]
    assert [verdict[b]["draws"][1]["p_holm"] for b in ("fedavg", "local", "pilot-no-ata", "pilot-no-client-s2")] == \
        pytest.approx(sm.holm(p))
    assert verdict["pilot-no-ata"]["mean"] == pytest.approx(0.5 * (3.04 + 0.02) * 100 / 42, abs=0.05)
    table = compare.sections(s)
    assert "| knowledge from other tasks helps" not in table["verdicts"]        # fedavg-task was not run
    assert "| Pilot above Local (pilot − local) | **holds** +" in table["verdicts"]
    assert "| pilot − pilot-no-ata | % of Local | +" in table["claims"] and " | undecided |" in table["claims"]


def test_the_room_split_and_the_share_of_the_cross_task_room_a_method_reaches():
    # vqa: Local 40, 42, 41; centralized-task 45, 46, 46; Centralized 55, 57, 56: cross-task room 10.33,
    # Pilot 47, 50, 48 reaches (48.33 - 45.67) / 10.33 = 0.258 of it. grounding: pooling the other tasks
    # costs 1 point at every seed (negative transfer): no room to reach, no share
    per = lambda v, g: [{"vqa": a, "grounding": b} for a, b in zip(v, g)]
    results = _runs(local=per([40, 42, 41], [60, 61, 62]), centralized_task=per([45, 46, 46], [70, 71, 72]),
                    centralized=per([55, 57, 56], [69, 70, 71]), pilot=per([47, 50, 48], [65, 66, 67]))
    s = sm.summarise("A", {0: ([0, 1, 2], results)})
    vqa, grounding = s["rooms"][0]["vqa"], s["rooms"][0]["grounding"]
    assert vqa["within"]["mean"] == 4.67 and vqa["cross"]["mean"] == 10.33 and vqa["cross"]["verdict"] == "above"
    assert vqa["share"]["pilot"] == pytest.approx((48.3333 - 45.6667) / 10.3333, abs=1e-3)
    assert grounding["cross"]["verdict"] == "below" and grounding["share"]["pilot"] is None
    table = compare.sections(s)["rooms"]
    assert "| vqa | 0 | 4.7 ± 0.6 (> 0) | 10.3 ± 0.6 (> 0) | 0.26 |" in table
    assert "| grounding | 0 | 10.0 ± 0.0 (> 0) | -1.0 ± 0.0 (< 0) | – |" in table
    brief = compare.sections(s)["rooms-brief"]
    assert "| vqa | +4.7 > | +10.3 > | 0.26 |" in brief and "| grounding | +10.0 > | -1.0 < | – |" in brief


def test_the_bounds_are_read_against_the_calibration_targets_on_each_draw():
    per = lambda c, v: [{"caption": a, "vqa": b} for a, b in zip(c, v)]
    draw = lambda cv: ([0, 1], _runs(local=per([290, 300], [40, 42]), centralized_task=per([300, 310], [45, 46]),
                                     centralized=per([350, 360], cv)))
    s = sm.summarise("A", {0: draw([52, 54]), 1: draw([47, 48])})
    b0, b1 = s["bounds"][0], s["bounds"][1]
    assert b0["room"] == round(204 / 168, 4) and b0["room_met"] and b0["learnable_met"]
    assert b1["centralized"]["vqa"] == 47.5 and not b1["learnable_met"]
    assert "| 1 | 168.0 ± 4.2 | 175.2 ± 3.9 | 201.2 ± 3.9 | 1.198 ✓ | 355.0 | 47.5 | ✗ | none |" in compare.sections(s)["bounds"]


# ----------------------------------------------------------------------------- files, tables, plots
def test_a_comparison_is_summarised_again_from_its_runs_and_fills_documents(tmp_path):
    for d, m, s, avg in [(0, "pilot", 1, 12), (0, "pilot", 0, 11), (0, "local", 0, 10), (0, "local", 1, 9),
                         (0, "pilot-top1", 0, 13), (0, "pilot-top1", 1, 14), (1, "pilot", 0, 12), (1, "local", 0, 10)]:
        (tmp_path / f"draw{d}" / f"{m}-seed{s}").mkdir(parents=True)
        (tmp_path / f"draw{d}" / f"{m}-seed{s}" / "results.json").write_text(json.dumps(_res(avg) | {"method": m, "seed": s}))
    draws = compare.load(tmp_path)
    assert sorted(draws) == [0, 1] and draws[0][0] == [0, 1] and list(draws[0][1]) == ["local", "pilot", "pilot-top1"]
    summary = compare.write(tmp_path, log=lambda *a: None)
    assert summary["draws"][0]["methods"]["pilot-top1"]["vs_pilot"]["vqa"]["per_seed"] == [2, 2]
    assert [c["baseline"] for c in summary["claims"]] == ["local"]     # the M rows stay on draw 0, outside the claims
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- compare A verdicts -->\nold\n<!-- end -->\nmiddle\n<!-- compare A results-draw0 -->\n<!-- end -->\n")
    compare.into(doc, {"A": compare.sections(summary)})
    text = doc.read_text()
    assert "\nold\n" not in text and "| pilot | 121.0 ± 7.4 | 11.5 ± 0.7 | 11.5 ± 0.7 |" in text
    assert "| Pilot above Local (pilot − local) | undecided +20.5 |" in text
    compare.into(doc, {"A": compare.sections(summary)})
    assert doc.read_text() == text                                   # filling again changes nothing
    with pytest.raises(KeyError, match="no section 'verdicts' of scenario 'B'"):
        doc.write_text("<!-- compare B verdicts -->\n<!-- end -->\n")
        compare.into(doc, {"A": compare.sections(summary)})
    (tmp_path / "draw0" / "fedavg-seed0").mkdir()
    (tmp_path / "draw0" / "fedavg-seed0" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="fedavg lacks seeds \\[1\\] that another method has"):
        compare.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no draw<d>/<method>-seed<s>/results.json"):
        compare.load(tmp_path / "draw0")


def test_ata_by_task_says_which_tasks_fill_a_clients_neighbours():
    clients = [{"id": 0, "task": "caption"}, {"id": 1, "task": "caption"}, {"id": 2, "task": "vqa"},
               {"id": 3, "task": "grounding"}]
    rounds = [{"same_task_mean": 0.25, "neighbours": {"0": [1, 2], "1": [0, 3], "2": [0, 3], "3": [2, 1]},
               "other_task_weight_mean": 0.5},
              {"same_task_mean": 0.25, "neighbours": {"0": [1, 3], "1": [0, 3], "2": [3, 1], "3": [2, 0]},
               "other_task_weight_mean": 0.3}]
    res = {"clients": clients, "ata": rounds}
    # the caption clients' 8 neighbours: 4 caption, 1 vqa, 3 grounding
    assert sm.ata_by_task(res) == {"caption": {"caption": 0.5, "vqa": 0.125, "grounding": 0.375},
                                   "vqa": {"caption": 0.5, "vqa": 0.0, "grounding": 0.5},
                                   "grounding": {"caption": 0.5, "vqa": 0.5, "grounding": 0.0}}
    assert sm.ata_by_task({"clients": clients, "ata": []}) == {}
    other = {"clients": clients, "ata": [rounds[0], rounds[0]]}   # round 1 twice: caption -> vqa 0.25
    s = sm.summarise_draw([0, 1], {"pilot": [_res(1) | res, _res(1) | other], "local": [_res(1, clients=clients)] * 2})
    assert s["methods"]["local"]["ata_by_task"] is None
    table = compare.draw_sections("A", 0, s)["ata"]
    assert "| pilot | 0.25 | 0.45 | caption → caption 0.50/0.50, vqa 0.12/0.25, grounding 0.38/0.25;" in table


def test_plots_draw_a_panel_per_measure_and_the_test_loss_round_by_round(tmp_path):
    pytest.importorskip("matplotlib")
    rounds = lambda avg: [{"round": 1, "average_ce": 1.2}, {"round": 2, "average": avg, "average_ce": 1.0}]
    s = sm.summarise_draw([0, 1], {m: [_res(10 + i, rounds=rounds(10 + i)), _res(12 + i, rounds=rounds(12 + i))]
                                   for i, m in enumerate(["local", "pilot", "pilot-no-ata"])})
    assert [r["round"] for r in s["methods"]["pilot"]["rounds"]] == [1, 2]
    assert compare.plots("A", 0, s, tmp_path) == f"wrote {tmp_path}/scores.png, {tmp_path}/rounds.png"
    assert (tmp_path / "scores.png").stat().st_size > 5000 and (tmp_path / "rounds.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- running
def _small(backbone_dir, **kw):
    return Config(clients=[0, 2], n_train=8, n_test=2, batch_size=4, local_steps=2, rounds_stage1=1, rounds_stage2=1,
                  backbone=str(backbone_dir), **kw)


def test_a_comparison_run_side_by_side_gives_the_same_results(small_backbone_dir, tmp_path):
    cfg = _small(small_backbone_dir)
    threads = torch.get_num_threads()     # the same thread count both ways: this checks the running, not rounding
    one = compare.run_comparison(replace(cfg, out=str(tmp_path / "one")), ["pilot"], [0, 1], log=lambda *a: None)
    logs = []
    two = compare.run_comparison(replace(cfg, out=str(tmp_path / "two")), ["pilot"], [0, 1], jobs=2,
                                 threads=threads, log=logs.append)
    drop = lambda s: {m: {k: v for k, v in x.items() if k != "wall_s"} for m, x in s["draws"][0]["methods"].items()}
    assert drop(one) == drop(two)
    for s, k in [(0, 0), (1, 2)]:
        run_dir = lambda d: d / "draw0" / f"pilot-seed{s}"
        assert ((run_dir(tmp_path / "one") / f"predictions_client_{k}.jsonl").read_text()
                == (run_dir(tmp_path / "two") / f"predictions_client_{k}.jsonl").read_text())
        assert "round 2/2" in (run_dir(tmp_path / "two") / "run.log").read_text()
    assert sum("draw0/pilot-seed" in line and "(2/2)" in line for line in logs) == 1
    assert one["draws"][0]["methods"]["pilot"]["ata_by_task"] is not None
    # started again, it runs nothing: both runs are complete
    logs = []
    compare.run_comparison(replace(cfg, out=str(tmp_path / "one")), ["pilot"], [0, 1], log=logs.append)
    assert "2 runs: 2 complete, kept; 0 to resume; 0 to start" in logs
    with pytest.raises(ValueError, match="holds a run of other settings \\(lr_stage1"):
        compare.run_comparison(replace(cfg, out=str(tmp_path / "one"), lr_stage1=1e-2), ["pilot"], [0], log=logs.append)


def test_an_interrupted_comparison_continues_where_it_stopped(small_backbone_dir, tmp_path):
    """Killed while its second run is in round 2: started again, the comparison keeps the complete run
    as it was, resumes the half-done one from its checkpoint, and ends with the results of a
    comparison that was never interrupted."""
    argv = lambda out: [sys.executable, "compare.py", "--scenario", "A", "--clients", "0,2", "--n-train", "8",
                        "--n-test", "2", "--batch-size", "4", "--local-steps", "2", "--rounds-stage1", "1",
                        "--rounds-stage2", "1", "--checkpoint", "client", "--methods", "local,pilot", "--seeds", "0",
                        "--backbone", str(small_backbone_dir), "--out", str(out)]
    env = dict(os.environ, PILOT_CACHE=str(tmp_path / "cache"))
    ref = subprocess.run(argv(tmp_path / "ref"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen(argv(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, deadline = out / "draw0" / "pilot-seed0" / "state.json", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            p = json.loads(state.read_text())["progress"]
        except (OSError, ValueError, KeyError):
            p = None
        if p and p["round"] == 1 and len(p["done"]) == 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert p and p["round"] == 1, "the comparison ended before it could be killed"
    done = (out / "draw0" / "local-seed0" / "results.json").read_bytes()
    again = subprocess.run(argv(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 runs: 1 complete, kept; 1 to resume; 0 to start" in again.stdout
    assert (out / "draw0" / "local-seed0" / "results.json").read_bytes() == done
    assert "resumed from" in again.stdout and "round 2/2" in again.stdout and "round 1/2" not in again.stdout
    for m, k in (("pilot", 0), ("pilot", 2), ("local", 2)):
        a, b = (d / "draw0" / f"{m}-seed0" / f"predictions_client_{k}.jsonl" for d in (tmp_path / "ref", out))
        assert a.read_text() == b.read_text()
    drop = lambda r: {k: v for k, v in r.items() if k not in ("wall_s", "config")}
    a, b = (json.loads((d / "draw0" / "pilot-seed0" / "results.json").read_text()) for d in (tmp_path / "ref", out))
    assert drop(a) == drop(b)


def test_a_comparisons_command_line(capsys):
    for argv, why in ((["--methods", "local", "--jobs", "0"], "--jobs 0"), (["--methods", "nope"], "unknown method 'nope'"),
                      (["--data-seed", "1"], "--data-seed: a comparison takes --data-seeds")):
        with pytest.raises(SystemExit) as e:
            compare.main(argv)
        assert e.value.code == 2 and why in capsys.readouterr().err
