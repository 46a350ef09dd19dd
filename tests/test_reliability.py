"""Checkpoint and resume, upload validation, fault injection, memory across clients, bad command lines."""
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
from safetensors.torch import load_file

import aggregate
import backbone
import checkpoint
import federation
import run
import server
from config import METHODS, Config

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
    out = server.server_round([ups[0], None, ups[2]], tasks, n, 1, METHODS["pilot"], previous=prev)
    assert torch.equal(out[0]["global_task_adapter.vqa.w"], torch.ones(2))       # mean of clients 0 and 2
    assert torch.equal(out[1]["lora.a"], prev[1]["lora.a"])                         # its own Θ^l stays
    assert torch.equal(out[1]["global_task_adapter.vqa.w"], torch.ones(2))       # the global state is new
    assert server.server_round([None] * 3, tasks, n, 1, METHODS["pilot"], previous=prev) == prev


def _small_run(out, *extra):
    return [sys.executable, "run.py", "--scenario", "A", "--clients", "0,2,4", "--n-train", "160", "--n-test", "30",
            "--rounds-stage1", "1", "--rounds-stage2", "1", "--local-steps", "20", "--top-m", "1", "--checkpoint", "client",
            "--out", str(out), *extra]


def _env(cache):
    return dict(os.environ, PILOT_CACHE=str(cache))


@pytest.fixture(scope="module")
def uninterrupted(small_backbone_dir, tmp_path_factory):
    """The reference: the small run from start to end, its output captured (not a terminal)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    ref = subprocess.run(_small_run(out, "--backbone", str(small_backbone_dir)), cwd=ROOT,
                         env=_env(small_backbone_dir.parent), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return out, ref


def test_logs_have_one_line_per_client_per_round_and_no_progress_bars(uninterrupted):
    _, ref = uninterrupted
    text = ref.stdout + ref.stderr
    assert "\r" not in text and len(text) < 20_000
    for r in (1, 2):
        for k, task in ((0, "caption"), (2, "vqa"), (4, "grounding")):     # named by their ids
            assert sum(f"client {k} ({task}) round {r}: 20 steps, loss " in line for line in text.splitlines()) == 1


def _kill_when(cmd, env, out, condition):
    """Start cmd, SIGKILL it as soon as condition(progress) holds; returns that progress or None."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            p = json.loads((out / "state.json").read_text())["progress"]
        except (OSError, ValueError, KeyError):
            p = None
        if p and condition(p):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return p
        time.sleep(0.01)
    proc.kill()
    return None


@pytest.mark.parametrize("where, condition", [
    ("mid-round, in stage 2", lambda p: p["round"] == 1 and len(p["done"]) == 1),
    # the last aggregation is committed: what is left is the final evaluation (with stage 2's connector)
    ("during the final evaluation", lambda p: p["round"] == 2 and not p["done"]),
])
def test_kill_and_resume_ends_exactly_like_an_uninterrupted_run(small_backbone_dir, tmp_path, uninterrupted,
                                                                 where, condition):
    ref_out, _ = uninterrupted
    cache = small_backbone_dir.parent
    bb = ["--backbone", str(small_backbone_dir)]
    out = tmp_path / "killed"
    killed_at = _kill_when(_small_run(out, *bb), _env(cache), out, condition)
    assert killed_at is not None, f"the run ended before it could be killed {where}"
    assert not (out / "results.json").exists()
    res = subprocess.run(_small_run(out, *bb, "--resume"), cwd=ROOT, env=_env(cache), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref_out, out))
    # scores, test losses (which tell the stage-1 connector from the stage-2 one) and predictions
    assert a["clients"] == b["clients"]
    assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    for k in (0, 2, 4):
        ta, tb = (load_file(str(d / f"client_{k}.safetensors")) for d in (ref_out, out))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[key], tb[key]) for key in ta)


def test_checkpoints_write_the_round_once_per_aggregation_and_each_turn_alone(small_backbone_dir, tmp_path, monkeypatch):
    written, save_round, save_turn = [], checkpoint.save_round, checkpoint.save_turn
    monkeypatch.setattr(checkpoint, "save_round", lambda out, meta, groups: (
        written.append(("round", meta["progress"]["round"], meta["progress"]["done"], sorted(groups))),
        save_round(out, meta, groups)))
    monkeypatch.setattr(checkpoint, "save_turn", lambda out, meta, k, states: (
        written.append(("turn", meta["progress"]["round"], meta["progress"]["done"], k, sorted(states),
                        sorted({key.split(".")[0] for key in states["uploads"]}))),
        save_turn(out, meta, k, states)))
    base = dict(clients=[0, 2], n_train=8, n_test=2, batch_size=4, rounds_stage1=1, rounds_stage2=1, top_m=1,
                backbone=str(small_backbone_dir))
    run.run(Config(**base, out=str(tmp_path / "round")), log=lambda *a: None)    # the tiny preset's "round"
    shared = ["downloads", "private"]
    assert written == [("round", r, [], shared) for r in (0, 1, 2)]
    written.clear()
    run.run(Config(**base, checkpoint="client", out=str(tmp_path / "client")), log=lambda *a: None)
    # a client's turn writes its upload and its new private state, nothing of the other clients
    turn = lambda r, done, k: ("turn", r, done, k, ["pending", "uploads"], ["lora", "task_adapter"])
    assert written == [("round", 0, [], shared), turn(0, [0], 0), turn(0, [0, 1], 1), ("round", 1, [], shared),
                       turn(1, [0], 0), turn(1, [0, 1], 1), ("round", 2, [], shared)]
    # after the last aggregation only the round's file is left, named with its size and hash
    meta = json.loads((tmp_path / "client" / "state.json").read_text())
    assert meta["turns"] == {} and sorted(f.name for f in (tmp_path / "client").glob("*-*.safetensors")) == \
        [meta["round_file"]["file"]]


class Killed(BaseException):
    """The process dies here (raised by a patched write, caught by the test)."""


@pytest.mark.parametrize("where", [
    "a turn's file half-written", "a turn's file written, not yet named by state.json",
    "the round's file written, not yet named by state.json", "state.json written, old files not yet removed"])
def test_a_kill_at_any_write_of_the_checkpoint_resumes_to_identical_tensors(small_backbone_dir, tmp_path, monkeypatch,
                                                                          where):
    """The per-turn layout's own kill points, each hit in stage 2 (the second round) of a run that
    checkpoints after every client, then --resume: the results and every final tensor are the
    uninterrupted run's."""
    base = Config(clients=[0, 2, 4], n_train=8, n_test=3, batch_size=4, rounds_stage1=1, rounds_stage2=1, top_m=1,
                  checkpoint="client", backbone=str(small_backbone_dir))
    ref = run.run(replace(base, out=str(tmp_path / "ref")), log=lambda *a: None)
    atomic_write, seen = checkpoint.atomic_write, []

    def dying_write(path, write):
        kind = "state" if path.name == "state.json" else path.name.split("-")[0]
        seen.append(kind)
        # the second round's first turn (or its aggregation), after the first round's writes
        hit = {"a turn's file half-written": kind == "turn" and seen.count("turn") == 4,
               "a turn's file written, not yet named by state.json": kind == "turn" and seen.count("turn") == 4,
               "the round's file written, not yet named by state.json": kind == "round" and seen.count("round") == 3,
               "state.json written, old files not yet removed": kind == "state" and seen.count("round") == 3}[where]
        if hit and where == "a turn's file half-written":
            with open(path.with_name(f".{path.name}.tmp"), "wb") as f:
                f.write(b"\0" * 100)
            raise Killed
        atomic_write(path, write)
        if hit:
            raise Killed
    monkeypatch.setattr(checkpoint, "atomic_write", dying_write)
    with pytest.raises(Killed):
        run.run(replace(base, out=str(tmp_path / "killed")), log=lambda *a: None)
    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    assert not (tmp_path / "killed" / "results.json").exists()
    logs = []
    res = run.run(replace(base, out=str(tmp_path / "killed"), resume=True), log=logs.append)
    assert any(line.startswith("resumed from") for line in logs)
    assert res["clients"] == ref["clients"] and res["bytes_up"] == ref["bytes_up"] and res["bytes_down"] == ref["bytes_down"]
    for k in (0, 2, 4):
        a, b = (load_file(str(tmp_path / d / f"client_{k}.safetensors")) for d in ("ref", "killed"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_turn_writes_a_fraction_of_what_a_whole_checkpoint_writes(small_backbone_dir, tmp_path):
    """The bytes a client's turn writes against the round's file: one client's upload and private
    state against every client's download and private state."""
    out = tmp_path / "sizes"
    cfg = Config(clients=[0, 1, 2, 3, 4, 5], n_train=8, n_test=2, batch_size=4, rounds_stage1=1, rounds_stage2=1,
                 top_m=1, checkpoint="client", backbone=str(small_backbone_dir), out=str(out))
    sizes, save_turn = [], checkpoint.save_turn

    def measured(out_, meta, k, states):
        save_turn(out_, meta, k, states)
        sizes.append(json.loads((out_ / "state.json").read_text())["turns"][str(k)]["size"])
    import unittest.mock
    with unittest.mock.patch.object(checkpoint, "save_turn", measured):
        run.run(cfg, log=lambda *a: None)
    round_size = json.loads((out / "state.json").read_text())["round_file"]["size"]
    assert len(sizes) == 12 and max(sizes) < round_size / 3, (sizes, round_size)


def test_a_rejected_round_rolls_the_clients_private_state_back(small_backbone_dir, tmp_path):
    """Client 2's upload in round 2 has a NaN and is rejected; the private state (ψ_s) that round
    trained is discarded, so round 3 trains from the state of round 1. That is exactly what a client
    that missed round 2 (crashed, nothing to roll back) does: the two runs must end identically."""
    base = dict(clients=[0, 2, 3], n_train=8, n_test=3, batch_size=4, rounds_stage1=2, rounds_stage2=1, top_m=1,
                backbone=str(small_backbone_dir))
    logs = {}
    res = {}
    for fault in ("nan", "drop"):
        logs[fault] = []
        res[fault] = run.run(Config(**base, faults=f"client=2:{fault}@2", out=str(tmp_path / fault)),
                             log=logs[fault].append)
    assert any("rejected the upload of client 2: " in line and "non-finite" in line for line in logs["nan"])
    # round 3 of the NaN run is healthy: trained, finite, accepted
    line = next(line for line in logs["nan"] if line.strip().startswith("client 2 (vqa) round 3:"))
    assert "steps, loss" in line and "nan" not in line
    assert sum(line.strip().startswith("rejected") for line in logs["nan"]) == 1
    assert res["nan"]["clients"] == res["drop"]["clients"]
    for k in (0, 2, 3):
        a, b = (load_file(str(tmp_path / f / f"client_{k}.safetensors")) for f in ("nan", "drop"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), k
    # and the rollback is what made them equal: round 2's training did change client 1's ψ_s
    trained = run.run(Config(**base, out=str(tmp_path / "clean")), log=lambda *a: None)
    clean = load_file(str(tmp_path / "clean" / "client_2.safetensors"))
    mine = load_file(str(tmp_path / "nan" / "client_2.safetensors"))
    assert not torch.equal(clean["private.client_adapter.linear_2.weight"], mine["private.client_adapter.linear_2.weight"])
    assert trained["clients"][1]["id"] == 2


def _resumed(out, cfg):
    """The checkpoint a --resume of cfg in out continues from (federation.open_out), or its CheckpointError."""
    return federation.open_out(replace(cfg, out=str(out), resume=True), "")[2]


def test_resume_refuses_other_settings_and_corrupted_checkpoints(small_backbone_dir, tmp_path):
    out = tmp_path / "run"
    cfg = Config(clients=[0, 2], n_train=8, n_test=2, batch_size=4, rounds_stage1=1, rounds_stage2=0, top_m=1,
                 backbone=str(small_backbone_dir), out=str(out))
    run.run(cfg, log=lambda *a: None)
    with pytest.raises(checkpoint.CheckpointError, match=r"other settings: method \(saved 'pilot', now 'fedavg'\), seed \(saved 0, now 1\)"):
        run.run(replace(cfg, seed=1, method="fedavg", resume=True), log=lambda *a: None)
    # a checkpoint older than a setting (no 'warmup_ratio' in its config) is read as having its default
    meta = json.loads((out / "state.json").read_text())
    del meta["config"]["warmup_ratio"]
    (out / "state.json").write_text(json.dumps(meta))
    assert _resumed(out, cfg)[0]["config"] == meta["config"]
    with pytest.raises(checkpoint.CheckpointError, match=r"warmup_ratio \(saved 0.03, now 0.1\)"):
        _resumed(out, replace(cfg, warmup_ratio=0.1))
    # 'tiny' after a change of its recipe is another backbone: refused without loading either
    assert meta["backbone_recipe"] is None                              # a checkpoint directory
    tiny = dict(meta, config=dict(meta["config"], backbone="tiny"), backbone_recipe="tiny-000000000000")
    (out / "state.json").write_text(json.dumps(tiny))
    with pytest.raises(checkpoint.CheckpointError, match=r"the tiny backbone's recipe \(saved 'tiny-000000000000', now 'tiny-"):
        _resumed(out, replace(cfg, backbone="tiny"))
    (out / "state.json").write_text(json.dumps(dict(tiny, backbone_recipe=backbone.tiny_backbone_key())))
    assert _resumed(out, replace(cfg, backbone="tiny"))
    (out / "state.json").write_text(json.dumps(meta))
    tensors = out / meta["round_file"]["file"]
    tensors.write_bytes(tensors.read_bytes()[:-10])                   # truncated
    with pytest.raises(checkpoint.CheckpointError, match="corrupted or truncated"):
        run.run(replace(cfg, resume=True), log=lambda *a: None)
    (out / "state.json").write_text(json.dumps(dict(meta, format="pilot-checkpoint-1")))
    with pytest.raises(checkpoint.CheckpointError, match="a checkpoint of another format"):
        run.run(replace(cfg, resume=True), log=lambda *a: None)


def _another(value, name):
    """A value of the same kind as value, not equal to it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + ",x" if name == "lora_targets" else value + "x"
    return [7] if value is None or isinstance(value, list) else None


def test_resume_compares_every_setting_but_a_declared_few():
    """A Config field nobody listed is compared: a --resume that changes it is refused by name. Only
    where the run writes and on what device, where the backbone's files come from, how often it
    checkpoints, where H_v lives and the evaluation's extras may change."""
    assert set(federation.RESUME_MAY_DIFFER) == {"out", "device", "allow_download", "resume", "checkpoint", "grad_ckpt", "features",
                                                 "features_max_mb", "eval_batch_size", "eval_every_round",
                                                 "test_loss_every_round"}
    from dataclasses import asdict, fields
    cfg = Config(clients=[0, 2], n_train=8, top_m=1)
    saved = asdict(cfg)
    for f in fields(Config):
        changed = replace(cfg, **{f.name: _another(getattr(cfg, f.name), f.name)})
        named = [d.split(" (")[0] for d in federation.resume_differences(saved, changed)]
        if f.name in federation.RESUME_MAY_DIFFER:
            assert named == [], (f.name, named)
        else:
            assert f.name in named, f.name


def test_faults_nan_and_scale_are_rejected_drop_is_survived(small_backbone_dir, tmp_path):
    for fault, expect in (("client=2:nan", "rejected the upload of client 2: "), ("client=2:scale=100", "update norm"),
                          ("client=2:drop", None)):
        logs = []
        cfg = Config(clients=[0, 2, 3], n_train=8, n_test=2, batch_size=4, rounds_stage1=1, rounds_stage2=1,
                         top_m=1, backbone=str(small_backbone_dir), out=str(tmp_path / fault.replace(":", "_")), faults=fault)
        res = run.run(cfg, log=logs.append)
        assert len(res["clients"]) == 3
        if expect:
            assert any(expect in line for line in logs), logs
    logs = []
    run.run(replace(cfg, faults="client=2:scale=100", norm_screen=0.0, out=str(tmp_path / "noscreen")), log=logs.append)
    assert not any("rejected" in line for line in logs)


def test_peak_memory_does_not_grow_with_the_clients_trained(small_backbone_dir, tmp_path):
    logs = []
    cfg = Config(n_train=16, n_test=2, batch_size=8, rounds_stage1=1, rounds_stage2=0,
                     backbone=str(small_backbone_dir), out=str(tmp_path / "mem"))
    run.run(cfg, log=logs.append)
    peaks = [float(line.split("peak memory ")[1].split(" MB")[0]) for line in logs if "; peak memory " in line]
    assert len(peaks) == 6 and peaks[-1] <= 1.10 * peaks[0], peaks


@pytest.mark.parametrize("args, message", [
    (["--scenario", "C"], "unknown scenario 'C'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--top-m", "6"], "--top-m 6: must be at least 1 and below the number of clients (6)"),
    (["--out", "/nonexistent-parent/x"], "the parent directory /nonexistent-parent does not exist"),
    (["--backbone", "BACKBONE_DIR"], "not a LLaVA checkpoint"),
    (["--faults", "client=2:melt"], "--faults 'client=2:melt': expected"),
    (["--checkpoint", "sometimes"], "--checkpoint sometimes: expected one of client, round"),
    (["--data", "README.md"], "README.md: not valid JSON"),
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
            run.run(Config(clients=[0, 2], n_train=4, n_test=1, top_m=1, out=str(out)), log=lambda *a: None)
