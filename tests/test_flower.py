"""The Flower path (flower_app.py) against run.py, on a secured loopback deployment started here as
subprocesses (deployment engine, no Ray): a SuperLink with TLS (certificates made here) and
SuperNode authentication, a roster of node keys, Scenario A restricted to clients 0 and 2, one
stage-1 and one stage-2 round. Beside the two right nodes: an impostor (a registered key that claims
client 0) and a stranger (an unregistered key). Then the same run with its ServerApp killed in round 2
and resumed, one SuperNode restarted in between. Scores, predictions, bytes and every final tensor
(downloads and private state) must equal run.py's, bit for bit."""
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
from config import Config  # noqa: E402
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


def make_tls(d: Path):
    """A certificate authority and a SuperLink certificate for 127.0.0.1 / localhost: (ca, cert, key)."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, pub, signer, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(cert("pilot-test-ca", "pilot-test-ca", ca_key.public_key(), ca_key, True).public_bytes(pem))
    (d / "server.pem").write_bytes(cert("127.0.0.1", "pilot-test-ca", key.public_key(), ca_key, False, san).public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                     serialization.NoEncryption()))
    return d / "ca.crt", d / "server.pem", d / "server.key"


def make_node_key(d: Path, name):
    """A SuperNode's key pair as `ssh-keygen -t ecdsa -b 384` writes it: (private, public) paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP384R1())
    (d / name).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    (d / f"{name}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH))
    return d / name, d / f"{name}.pub"


def wait_for(predicate, what, limit_s, logs):
    t = time.time()
    while not predicate():
        if time.time() - t > limit_s:
            raise AssertionError(f"waited {limit_s} s for {what}:\n" + logs())
        time.sleep(0.2)


def serverapp_pids(root_pid):
    """The ServerApp processes the SuperLink started (their command line names flwr-serverapp)."""
    out = []
    for pid in descendants(root_pid):
        try:
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def flower_run(small_backbone_dir, tmp_path_factory):
    """The secured deployment: run 1 to the end (with an impostor and a stranger connected), run 2
    killed in round 2, run 2 resumed. Returns a dict of what the tests look at."""
    tmp = tmp_path_factory.mktemp("flower")
    logs, keys = tmp / "logs", tmp / "keys"
    logs.mkdir()
    keys.mkdir()
    bin_dir = str(Path(sys.executable).parent)      # flower-* and flwr-* entry points of this venv
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    link_port = free_port()
    exe = lambda name: str(Path(bin_dir) / name)
    procs = []
    ca, cert, cert_key = make_tls(keys)

    def start(name, args, home, threads=None):
        f = open(logs / f"{name}.log", "w")
        extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        procs.append(subprocess.Popen([exe(args[0]), *args[1:]], cwd=tmp, stdout=f, stderr=subprocess.STDOUT,
                                      env={**env, "FLWR_HOME": str(tmp / home), **extra}))
        return procs[-1]

    def read(name):
        p = logs / f"{name}.log"
        return p.read_text() if p.exists() else ""

    def all_logs():
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("*.log")))

    def node(name, cid, key, state=None):
        return start(name, ["flower-supernode", "--superlink", f"127.0.0.1:{link_port}", "--root-certificates", str(ca),
                     "--auth-supernode-private-key", str(key), "--host", "127.0.0.1", "--port", str(free_port()),
                     "--node-config", f'client-id={cid} state-dir="{tmp / "state" / (state or name)}"'], name, threads=1)

    cli_env = {**env, "FLWR_HOME": str(tmp / "cli")}

    def flwr_run(name, out, **extra):
        overrides = {"clients": ",".join(map(str, CLIENTS)), "backbone": str(small_backbone_dir), "out": str(out),
                     "roster": str(keys / "roster.json"), **{k.replace("_", "-"): v for k, v in SETTINGS.items()}, **extra}
        conf = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        return start(name, ["flwr", "run", str(ROOT), "test", "--stream", "--run-config", conf], "cli")

    res = {"out": tmp / "run1", "killed_out": tmp / "run2"}
    try:
        start("superlink", ["flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                            "--ssl-keyfile", str(cert_key), "--enable-supernode-auth",
                            "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link_port), "--database", str(tmp / "link.db")], "link")
        link = procs[-1]
        (tmp / "cli").mkdir()
        (tmp / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\n'
            f'root-certificates = "{ca}"\n')

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", link_port)) == 0
        wait_for(listening, "the SuperLink to listen", 60, all_logs)
        # register the keys of the two right nodes and of the impostor; the stranger's is never registered
        node_keys = {name: make_node_key(keys, name) for name in ("node0", "node2", "impostor", "stranger")}
        res["node_id"] = {}
        for name in ("node0", "node2", "impostor"):
            reg = subprocess.run([exe("flwr"), "supernode", "register", str(node_keys[name][1]), "test", "--format", "json"],
                                 env=cli_env, capture_output=True, text=True, timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
            res["node_id"][name] = json.loads(reg.stdout[reg.stdout.index("{"):])["node-id"]
        (keys / "roster.json").write_text(json.dumps({"clients": {"0": "node0.pub", "2": "node2.pub"}}))
        node2 = node("node2", 2, node_keys["node2"][0])
        node("impostor", 0, node_keys["impostor"][0])      # registered, but not client 0's key
        node("stranger", 2, node_keys["stranger"][0])      # not registered at all

        t0 = time.time()
        cli = flwr_run("run1", res["out"])
        # client 0's right node connects only once the impostor has been refused: the server waits for it
        wait_for(lambda: f"node {res['node_id']['impostor']} refused" in read("run1"), "the impostor's refusal",
                 RUN_LIMIT_S, all_logs)
        node("node0", 0, node_keys["node0"][0])
        cli.wait(timeout=RUN_LIMIT_S)
        res["wall_s"] = time.time() - t0

        # the same run again, its ServerApp killed (SIGKILL) once round 2's messages are out, then resumed
        cli = flwr_run("run2", res["killed_out"])
        wait_for(lambda: "round 2/2: sent to 2 clients" in read("run2"), "round 2", RUN_LIMIT_S, all_logs)
        victims = serverapp_pids(link.pid)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        res["killed"] = len(victims)
        res["round_at_kill"] = json.loads((res["killed_out"] / "state.json").read_text())["progress"]["round"]
        stop([cli])
        # client 2's SuperNode is restarted too (same key, same state directory): it continues from its file
        stop([node2])
        node("node2-restarted", 2, node_keys["node2"][0], state="node2")
        cli = flwr_run("run2-resumed", res["killed_out"], resume=True)
        cli.wait(timeout=RUN_LIMIT_S)
    finally:
        stop(procs)
    res["logs"] = all_logs()
    res["server_log"] = read("run1")
    res["stranger_log"] = read("stranger")
    res["resumed_log"] = read("run2-resumed")
    assert (res["out"] / "results.json").is_file(), "the Flower run wrote no results:\n" + res["logs"]
    shutil.rmtree(tmp / "link", ignore_errors=True)
    return res


def test_flower_run_equals_run_py(flower_run, small_backbone_dir, tmp_path):
    out, logs = flower_run["out"], flower_run["logs"]
    ref_out = tmp_path / "ref"
    t0 = time.time()
    # the SuperNodes share this machine's cores and run one thread each (else OpenMP threads of two
    # clients oversubscribe the cores); the reference uses one thread too, so that not even the
    # order of a parallel reduction differs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run.run(Config(clients=CLIENTS, backbone=str(small_backbone_dir), out=str(ref_out), **SETTINGS),
                      log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    print(f"wall time: Flower deployment {flower_run['wall_s']:.1f} s, run.py {time.time() - t0:.1f} s")
    same_as(ref, ref_out, out, logs)


def same_as(ref, ref_out, out, logs):
    """results.json in out equals ref (clients, scores, predictions, bytes), and every client's
    final tensors equal those in ref_out, bit for bit."""
    got = json.loads((out / "results.json").read_text())
    assert got["engine"] == "flower"
    # the same clients, scores, predictions (examples) and bytes communicated
    assert got["clients"] == ref["clients"], logs
    assert (got["per_task"], got["average"]) == (ref["per_task"], ref["average"])
    assert (got["bytes_up"], got["bytes_down"]) == (ref["bytes_up"], ref["bytes_down"]) and got["bytes_up"] > 0
    for cid in CLIENTS:
        a, b = load_file(str(ref_out / f"client_{cid}.safetensors")), load_file(str(out / f"client_{cid}.safetensors"))
        assert a.keys() == b.keys()
        # the client kept its private stage-1 and stage-2 tensors between rounds (its state file)
        assert any(k.startswith("private.client_adapter.") for k in a) and any(k.startswith("private.router.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), f"client {cid}: {k} differs"
    for cid in CLIENTS:
        preds = lambda d: (d / f"predictions_client_{cid}.jsonl").read_text()
        assert preds(out) == preds(ref_out)


def test_flower_roster_refuses_impostor_and_unregistered_node(flower_run):
    log, ids = flower_run["server_log"], flower_run["node_id"]
    # the registered node that claims client 0 with another key is refused, and the run waited for
    # the right one; only the roster's two nodes were admitted
    assert f"node {ids['impostor']} refused: claims client 0, but its key" in log, flower_run["logs"]
    assert f"node {ids['node0']} admitted as client 0" in log and f"node {ids['node2']} admitted as client 2" in log
    assert log.count("admitted as client") == 2
    # the unregistered node never got in: the SuperLink refused to activate it
    assert "Failed to activate SuperNode" in flower_run["stranger_log"], flower_run["stranger_log"][-2000:]


def test_roster_refusals():
    import flower_app
    assert flower_app.refusal(0, "k0", [0, 2], {0: "k0", 2: "k2"}, {}) is None
    assert "which this run does not have" in flower_app.refusal(1, "k0", [0, 2], {0: "k0", 2: "k2"}, {})
    assert "is not the roster's key for client 2" in flower_app.refusal(2, "k0", [0, 2], {0: "k0", 2: "k2"}, {})
    assert "which node 7 already serves" in flower_app.refusal(0, "k0", [0, 2], {0: "k0", 2: "k2"}, {0: 7})
    assert flower_app.refusal(2, "any", [0, 2], None, {0: 7}) is None      # no roster file: claims on trust


def test_roster_file_keys_match_the_superlinks_pem_form(tmp_path):
    import flower_app
    from cryptography.hazmat.primitives import serialization
    priv, pub = make_node_key(tmp_path, "node")
    pem = serialization.load_ssh_public_key(pub.read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)   # as NodeInfo.public_key
    _, other = make_node_key(tmp_path, "other")
    (tmp_path / "roster.json").write_text(json.dumps({"clients": {"3": "node.pub", "5": "other.pub"}}))
    keys = flower_app.read_roster_keys(tmp_path / "roster.json")
    assert keys[3] == flower_app.key_fingerprint(pem) != keys[5]
    (tmp_path / "bad.json").write_text(json.dumps({"clients": {"3": "missing.pub"}}))
    with pytest.raises(ValueError, match=r"roster .*bad.json: expected .*missing.pub"):
        flower_app.read_roster_keys(tmp_path / "bad.json")


def test_node_state_keeps_a_pending_round_only_when_accepted(tmp_path):
    import checkpoint
    import flower_app
    path = tmp_path / "client_0-run_x.safetensors"
    assert flower_app._private_before(path, 0, True) == ({}, -1)
    old, new = {"a": torch.zeros(2)}, {"a": torch.ones(2)}
    checkpoint.save_state(path, {"private": old, "pending": new}, {"private_round": 0, "pending_round": 1})
    kept, r = flower_app._private_before(path, 2, True)           # round 2's verdict on round 1: accepted
    assert torch.equal(kept["a"], new["a"]) and r == 1
    kept, r = flower_app._private_before(path, 2, False)          # rejected: the state before round 1
    assert torch.equal(kept["a"], old["a"]) and r == 0
    kept, r = flower_app._private_before(path, 1, True)           # round 1 again (a restarted server): its
    assert torch.equal(kept["a"], old["a"]) and r == 0            # earlier attempt's pending state is dropped
    with pytest.raises(checkpoint.CheckpointError, match="older checkpoint"):
        flower_app._private_before(path, 0, True)


def test_flower_serverapp_killed_in_round_2_resumes_to_the_same_result(flower_run):
    # the kill hit round 2: the ServerApp was running and its last checkpoint is round 1's aggregation
    assert flower_run["killed"] >= 1 and flower_run["round_at_kill"] == 1, flower_run["logs"]
    first, resumed = flower_run["out"], flower_run["killed_out"]
    assert "resumed from" in flower_run["resumed_log"]
    # the restarted SuperNode came back under its registered key, as the same node
    assert f"node {flower_run['node_id']['node2']} admitted as client 2" in flower_run["resumed_log"]
    same_as(json.loads((first / "results.json").read_text()), first, resumed, flower_run["logs"])


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
