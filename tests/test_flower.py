"""The Flower path (flower_app.py) against run.py: a SuperLink and two SuperNodes started here as
subprocesses on 127.0.0.1 (deployment engine, no Ray), one stage-1 and one stage-2 round of
Scenario A restricted to clients 0 and 2, then the same with run.py in this process. Scores,
predictions, bytes and every final tensor (downloads and private state) must be equal, bit for bit."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install -r requirements-flower.txt)")

import run  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = [0, 2]
SETTINGS = dict(rounds_stage1=1, rounds_stage2=1, top_m=1, n_train=8, n_test=3, batch_size=4, lora_r=8, lora_alpha=16)
RUN_LIMIT_S = 600          # the whole Flower run; it takes about a minute on 2 cores


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Every live process below pid (Linux /proc), so that what Flower starts is stopped too."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(procs):
    """SIGTERM each started process and everything below it, then SIGKILL what is left after 10 s."""
    pids = [p for proc in procs for p in [proc.pid, *descendants(proc.pid)]]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def flower_run(small_backbone_dir, tmp_path_factory):
    """Run the Flower deployment; returns (out dir, log text)."""
    tmp = tmp_path_factory.mktemp("flower")
    out, logs = tmp / "out", tmp / "logs"
    logs.mkdir()
    bin_dir = str(Path(sys.executable).parent)      # flower-* and flwr-* entry points of this venv
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    link_port = free_port()
    exe = lambda name: str(Path(bin_dir) / name)
    procs = []

    def start(name, args, home, threads=None):
        f = open(logs / f"{name}.log", "w")
        extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        procs.append(subprocess.Popen([exe(args[0]), *args[1:]], cwd=tmp, stdout=f, stderr=subprocess.STDOUT,
                                      env={**env, "FLWR_HOME": str(tmp / home), **extra}))

    def all_logs():
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("*.log")))

    try:
        start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link_port), "--database", str(tmp / "link.db")], "link")
        for cid in CLIENTS:
            start(f"supernode{cid}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                      "--node-config", f"client-id={cid}", "--host", "127.0.0.1", "--port", str(free_port())],
                  f"node{cid}", threads=1)
        # the CLI finds the SuperLink by name in FLWR_HOME/config.toml
        (tmp / "cli").mkdir()
        (tmp / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
        overrides = {"clients": ",".join(map(str, CLIENTS)), "backbone": str(small_backbone_dir), "out": str(out),
                     **{k.replace("_", "-"): v for k, v in SETTINGS.items()}}
        conf = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        t0 = time.time()
        for _ in range(30):     # the SuperLink takes a few seconds to listen
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", link_port)) == 0:
                    break
            time.sleep(1)
        cli = subprocess.run([exe("flwr"), "run", str(ROOT), "test", "--stream", "--run-config", conf],
                             env={**env, "FLWR_HOME": str(tmp / "cli")}, capture_output=True, text=True,
                             timeout=RUN_LIMIT_S)
        (logs / "flwr-run.log").write_text(cli.stdout + cli.stderr)
        wall = time.time() - t0
    finally:
        stop(procs)
    assert (out / "results.json").is_file(), "the Flower run wrote no results:\n" + all_logs()
    shutil.rmtree(tmp / "link", ignore_errors=True)
    return out, wall, all_logs()


def test_flower_run_equals_run_py(flower_run, small_backbone_dir, tmp_path):
    out, wall, logs = flower_run
    ref_out = tmp_path / "ref"
    t0 = time.time()
    # the SuperNodes share this machine's cores and run one thread each (else OpenMP threads of two
    # clients oversubscribe the cores); the reference uses one thread too, so that not even the
    # order of a parallel reduction differs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run.run(run.Config(clients=CLIENTS, backbone=str(small_backbone_dir), out=str(ref_out), **SETTINGS),
                      log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    print(f"wall time: Flower deployment {wall:.1f} s, run.py {time.time() - t0:.1f} s")
    got = json.loads((out / "results.json").read_text())
    assert got["engine"] == "flower"
    # the same clients, scores, predictions (examples) and bytes communicated
    assert got["clients"] == ref["clients"], logs
    assert (got["per_task"], got["average"]) == (ref["per_task"], ref["average"])
    assert (got["bytes_up"], got["bytes_down"]) == (ref["bytes_up"], ref["bytes_down"]) and got["bytes_up"] > 0
    for cid in CLIENTS:
        a, b = load_file(str(ref_out / f"client_{cid}.safetensors")), load_file(str(out / f"client_{cid}.safetensors"))
        assert a.keys() == b.keys()
        # the client kept its private stage-1 and stage-2 tensors between rounds (context.state)
        assert any(k.startswith("private.client_adapter.") for k in a) and any(k.startswith("private.router.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), f"client {cid}: {k} differs"


def test_flower_run_config_uses_run_py_names():
    import flower_app
    cfg = flower_app.config_from({"scenario": "B", "seed": 3, "rounds-stage1": 2, "rounds-stage2": 4, "top-m": 2,
                                  "backbone": "tiny", "clients": "0,1,5", "n-train": 0})
    assert (cfg.scenario, cfg.seed, cfg.rounds_stage1, cfg.rounds_stage2, cfg.top_m, cfg.backbone) == ("B", 3, 2, 4, 2, "tiny")
    assert cfg.clients == [0, 1, 5] and cfg.n_train is None
    preset = flower_app.config_from({"rounds-stage1": -1, "rounds-stage2": 0, "local-steps": -1, "top-m": 0})
    assert (preset.rounds_stage1, preset.rounds_stage2, preset.local_steps, preset.top_m) == (4, 0, 10, None)
    with pytest.raises(ValueError, match="unknown key 'rounds'"):
        flower_app.config_from({"rounds": 3})
    with pytest.raises(ValueError, match="--top-m 7"):
        flower_app.config_from({"top-m": 7})
