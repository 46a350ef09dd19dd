"""
Reporting: the results table, the per-task summaries, the files a run writes (results.json,
results.md, client_<id>.safetensors), sizes in bytes and the process's memory figures. Pure
functions of plain data, shared by run.py, flower_app.py and bench.py.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import checkpoint


def nbytes(state):
    """Bytes of a state dict's tensors (what a message carries)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def results_table(res):
    """A run's results as markdown: one row per client, then per task (score and test loss)."""
    tasks = list(res["per_task"])
    lines = [f"Scenario {res['scenario']}, method {res['method']}, seed {res['seed']}, backbone {res['backbone']}", "",
             "| client | task | metric | n_train | n_test | score | test loss |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['id']} | {c['task']} | {c['metric']} | {c['n_train']} | {c['n_test']} | {c['score']:.1f} "
              f"| {c['test_ce']:.3f} |" for c in res["clients"]]
    lines += ["", "| | " + " | ".join(tasks + ["average"]) + " |", "|---|" + "---|" * (len(tasks) + 1),
              "| score | " + " | ".join(f"{res['per_task'][t]:.1f}" for t in tasks) + f" | {res['average']:.1f} |",
              "| test loss | " + " | ".join(f"{res['per_task_ce'][t]:.3f}" for t in tasks) + f" | {res['average_ce']:.3f} |",
              "(test loss: mean answer-token cross-entropy on the client's test set, teacher-forced)", "",
              f"bytes uploaded {res['bytes_up']:,}, downloaded {res['bytes_down']:,}; wall time {res['wall_s']:.1f} s"]
    return "\n".join(lines)


def summarise_rows(rows, tasks, key="score", digits=2):
    """(per-task averages of the clients' scores, their overall average); key="test_ce": the same
    for the test loss."""
    per_task = {t: round(sum(r[key] for r in rows if r["task"] == t) / sum(r["task"] == t for r in rows), digits)
                for t in tasks}
    return per_task, round(sum(per_task.values()) / len(per_task), digits)


def save_client_state(out: Path, client_id, download, private):
    """OUT/client_<id>.safetensors: what the client downloaded last plus its private tensors."""
    tensors = {**download, **{f"private.{a}": b for a, b in private.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"client_{client_id}.safetensors"))


def write_results(out: Path, res, log=print):
    """OUT/results.json and OUT/results.md (the table, also printed), and each client's predictions
    on its whole test set in OUT/predictions_client_<id>.jsonl (one JSON object per line: id,
    question, answer, prediction and its score in percent units), taken out of the rows so that
    results.json stays small. Returns what results.json holds."""
    for row in res["clients"]:
        lines = [json.dumps(p) for p in row.get("predictions", [])]
        (out / f"predictions_client_{row['id']}.jsonl").write_text("".join(line + "\n" for line in lines))
    res = dict(res, clients=[{k: v for k, v in row.items() if k != "predictions"} for row in res["clients"]])
    table = results_table(res)
    (out / "results.md").write_text(table + "\n")
    # last and atomically: a results.json that exists is a complete run's (compare.py keeps those)
    checkpoint.atomic_write(out / "results.json", lambda f: f.write(json.dumps(res, indent=1).encode()))
    log("\n" + table + f"\n\nwrote {out}/results.json, results.md, predictions_client_*.jsonl, client_*.safetensors")
    return res


def reset_peak_memory(device):
    """Start a new high-water mark of this process's memory (Linux /proc; CUDA's allocator)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def resident_mb(field="VmRSS:"):
    """This process's resident memory (VmRSS) or its high-water mark (VmHWM) in MB; None off Linux."""
    try:
        return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(field))
    except (OSError, StopIteration):
        return None


def peak_memory(device):
    """(peak resident MB since reset_peak_memory, CUDA max allocated MB or None)."""
    return resident_mb("VmHWM:"), (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None)
