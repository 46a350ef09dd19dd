"""Checkpoint and resume, upload validation, fault injection, memory across clients, bad command lines."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aggregate
import checkpoint
import run

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"lora.a": ((2, 3), torch.float32), "task_adapter.w": ((4,), torch.float32)}


def _good():
    return {"lora.a": torch.zeros(2, 3), "task_adapter.w": torch.ones(4)}


@pytest.mark.parametrize("change, reason", [
    (lambda u: u.pop("lora.a"), "missing 1 tensors"),
    (lambda u: u.update(extra=torch.zeros(1)), "1 unexpected tensors"),
    (lambda u: u.update({"lora.a": torch.zeros(3, 2)}), "lora.a: (3, 2)"),
    (lambda u: u.update({"lora.a": torch.zeros(2, 3, dtype=torch.float64)}), "torch.float64"),
    (lambda u: u["task_adapter.w"].__setitem__(1, float("inf")), "non-finite"),
])
def test_validate_upload_names_what_is_wrong(change, reason):
    assert aggregate.validate_upload(_good(), EXPECTED) is None
    u = _good()
    change(u)
    assert reason in aggregate.validate_upload(u, EXPECTED)


def test_norm_screen_rejects_outliers_only():
    assert aggregate.norm_screen([1.0, 1.2, 0.9, 100.0], 5) == [True, True, True, False]
    assert aggregate.norm_screen([1.0, None, 2.0], 5) == [True, False, True]
    assert aggregate.update_norm({"a": torch.tensor([3.0, 4.0])}, {"a": torch.zeros(2)}) == 5.0


def test_rejected_client_keeps_its_text_adapter_and_all_rejected_keeps_the_server_state():
    ups = [{"task_adapter.w": torch.full((2,), float(k)), "lora.a": torch.full((2,), float(k))} for k in range(3)]
    prev = [{"global_task_adapter.vqa.w": torch.full((2,), -1.0), "lora.a": torch.full((2,), -float(k))} for k in range(3)]
    tasks, n = ["vqa", "vqa", "vqa"], [1, 1, 1]
    out = run.server_round([ups[0], None, ups[2]], tasks, n, 1, run.METHODS["pilot"], previous=prev)
    assert torch.equal(out[0]["global_task_adapter.vqa.w"], torch.ones(2))       # mean of clients 0 and 2
    assert torch.equal(out[1]["lora.a"], prev[1]["lora.a"])                         # its own Θ^l stays
    assert torch.equal(out[1]["global_task_adapter.vqa.w"], torch.ones(2))       # the global state is new
    assert run.server_round([None] * 3, tasks, n, 1, run.METHODS["pilot"], previous=prev) == prev


def _small_run(out, *extra):
    return [sys.executable, "run.py", "--scenario", "A", "--clients", "0,2,4", "--n-train", "160", "--n-test", "4",
            "--rounds-stage1", "1", "--rounds-stage2", "1", "--top-m", "1", "--out", str(out), *extra]


def _env(cache):
    return dict(os.environ, PILOT_CACHE=str(cache))


def test_kill_and_resume_ends_exactly_like_an_uninterrupted_run(small_backbone_dir, tmp_path):
    cache = small_backbone_dir.parent
    bb = ["--backbone", str(small_backbone_dir)]
    ref = subprocess.run(_small_run(tmp_path / "ref", *bb), cwd=ROOT, env=_env(cache), capture_output=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_small_run(out, *bb), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            p = json.loads((out / "state.json").read_text())["progress"]
        except (OSError, ValueError, KeyError):
            p = None
        if p and p["round"] == 1 and len(p["done"]) == 1:      # mid-round, in stage 2
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = p
            break
        time.sleep(0.02)
    assert killed_at is not None, "the run ended before it could be killed mid-round"
    assert not (out / "results.json").exists()
    res = subprocess.run(_small_run(out, *bb, "--resume"), cwd=ROOT, env=_env(cache), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "ref", out))
    assert [c["score"] for c in a["clients"]] == [c["score"] for c in b["clients"]]
    assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    for k in (0, 2, 4):
        ta, tb = (load_file(str(d / f"client_{k}.safetensors")) for d in (tmp_path / "ref", out))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[key], tb[key]) for key in ta)


def test_resume_refuses_other_settings_and_corrupted_checkpoints(small_backbone_dir, tmp_path):
    out = tmp_path / "run"
    cfg = run.Config(clients=[0, 2], n_train=8, n_test=2, batch_size=4, rounds_stage1=1, rounds_stage2=0, top_m=1,
                     backbone=str(small_backbone_dir), out=str(out))
    run.run(cfg, log=lambda *a: None)
    with pytest.raises(checkpoint.CheckpointError, match=r"other settings: method \(saved 'pilot', now 'fedavg'\), seed \(saved 0, now 1\)"):
        run.run(run.Config(**{**cfg.__dict__, "seed": 1, "method": "fedavg", "resume": True}), log=lambda *a: None)
    meta = json.loads((out / "state.json").read_text())
    tensors = out / meta["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:-10])                   # truncated
    with pytest.raises(checkpoint.CheckpointError, match="corrupted or truncated"):
        run.run(run.Config(**{**cfg.__dict__, "resume": True}), log=lambda *a: None)


def test_faults_nan_and_scale_are_rejected_drop_is_survived(small_backbone_dir, tmp_path):
    for fault, expect in (("client=1:nan", "rejected the upload of client 1: "), ("client=1:scale=100", "update norm"),
                          ("client=1:drop", None)):
        logs = []
        cfg = run.Config(clients=[0, 2, 3], n_train=8, n_test=2, batch_size=4, rounds_stage1=1, rounds_stage2=1,
                         top_m=1, backbone=str(small_backbone_dir), out=str(tmp_path / fault.replace(":", "_")), faults=fault)
        res = run.run(cfg, log=logs.append)
        assert len(res["clients"]) == 3
        if expect:
            assert any(expect in line for line in logs), logs
    logs = []
    run.run(run.Config(**{**cfg.__dict__, "faults": "client=1:scale=100", "norm_screen": 0.0,
                          "out": str(tmp_path / "noscreen")}), log=logs.append)
    assert not any("rejected" in line for line in logs)


def test_peak_memory_does_not_grow_with_the_clients_trained(small_backbone_dir, tmp_path):
    logs = []
    cfg = run.Config(n_train=16, n_test=2, batch_size=8, rounds_stage1=1, rounds_stage2=0,
                     backbone=str(small_backbone_dir), out=str(tmp_path / "mem"))
    run.run(cfg, log=logs.append)
    peaks = [float(line.split("peak memory ")[1].split(" MB")[0]) for line in logs if "done: peak memory" in line]
    assert len(peaks) == 6 and peaks[-1] <= 1.10 * peaks[0], peaks


@pytest.mark.parametrize("args, message", [
    (["--scenario", "C"], "argument --scenario: invalid choice"),
    (["--method", "nope"], "argument --method: invalid choice"),
    (["--top-m", "6"], "--top-m 6: must be at least 1 and below the number of clients (6)"),
    (["--out", "/nonexistent-parent/x"], "the parent directory /nonexistent-parent does not exist"),
    (["--backbone", "BACKBONE_DIR"], "not a LLaVA checkpoint"),
])
def test_bad_command_lines_fail_in_one_line_with_exit_2(tmp_path, args, message):
    (tmp_path / "notllava").mkdir()
    args = [str(tmp_path / "notllava") if a == "BACKBONE_DIR" else a for a in args]
    out = tmp_path / "never"
    full = [sys.executable, "run.py", *args] + ([] if "--out" in args else ["--out", str(out)])
    p = subprocess.run(full, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(checkpoint.CheckpointError, match="another run is writing there"):
            run.run(run.Config(clients=[0, 2], n_train=4, n_test=1, top_m=1, out=str(out)), log=lambda *a: None)
