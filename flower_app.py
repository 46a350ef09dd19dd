"""
Pilot across machines on Flower (optional: pip install -r requirements-flower.txt). The same client
and server steps as run.py, carried by Flower's deployment engine instead of a Python loop:

    flower-superlink --insecure                                   # the server's host
    flower-supernode --insecure --superlink HOST:8000 --node-config "client-id=0"   # one per client
    flwr run . pilot-local --stream -c 'clients="0,2" rounds-stage1=1 rounds-stage2=1'

docs/deploy.md has the whole recipe (TLS, SuperNode keys, the roster, resume, loopback, the CLI's
config.toml).

Who holds what:
    server (ServerApp)  Θ^l_0, every client's current download, the loop (federation.federate, the
                        same as run.py's: rounds, server.server_step, checkpoint and resume, results),
                        the roster: which clients the run has, their tasks and sample counts (from
                        the scenario or the manifest, never from a node) and, with a roster file,
                        which SuperNode key may serve each; a checkpoint in OUT after every round
    client (ClientApp)  its data and H_v, its private ψ_s, ψ^c, φ (in a file in the node's own
                        state directory, never in a message); it receives only the global task
                        adapters and its own Θ̄^l_k
Messages: QUERY (which client a node claims), TRAIN (download + round and stage -> upload), EVALUATE
(final download -> the client's results row; the client also writes its OUT/client_<id>.safetensors,
as run.py does).

Pilot sends each client its own Θ̄^l_k, so the server drives the rounds itself (@app.main() with
the Grid) rather than through a Strategy, whose configure_train sends one model to all.
"""
import hashlib
import json
import secrets
import time
from dataclasses import fields, replace
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

import backbone
import checkpoint
import data
import evaluate as evaluation
import features
import llava
import report
from client import client_step
from config import Config, check_config, fault_for, parse_faults, recipe_line, with_defaults
from federation import federate, load_clients, load_model, open_out

NODE_WAIT_S = 300        # how long the server waits for every client's SuperNode to be admitted
QUERY_TIMEOUT_S = 120    # how long a node may take to say which client it holds


def log(msg):
    flwr_log(INFO, msg)


# ----------------------------------------------------------------------------- configuration
# [tool.flwr.app.config] uses run.py's flag names; TOML has no None, so 0 / "" stand for "default".
OPTIONAL = {"clients", "n_train", "n_test", "lora_r", "lora_alpha", "top_m", "batch_size", "dtype"}
PRESET = {"rounds_stage1", "rounds_stage2", "local_steps"}     # -1: the backbone's preset (0 is a real value)
SERVER_ONLY = {"roster"}   # keys of the Flower deployment itself, not of config.Config


def config_from(run_config) -> Config:
    """config.Config from Flower's run config (keys as run.py's flags: 'rounds-stage1', 'top-m', ...)."""
    known = {f.name for f in fields(Config)}
    kw = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in SERVER_ONLY:
            continue
        if name not in known:
            raise ValueError(f"pyproject.toml [tool.flwr.app.config]: unknown key {key!r}")
        if name in OPTIONAL and value in (0, "") or name in PRESET and value == -1:
            value = None
        elif name == "clients":
            value = [int(x) for x in str(value).split(",")]
        kw[name] = value
    cfg = Config(**kw)
    check_config(cfg)
    if cfg.eval_every_round or cfg.test_loss_every_round:
        raise ValueError("eval-every-round, test-loss-every-round: run.py only (a Flower run evaluates once, at the end)")
    return cfg


# ----------------------------------------------------------------------------- client side
client_app = ClientApp()


def _claimed_id(context: Context) -> int:
    if "client-id" not in context.node_config:
        raise ValueError("this SuperNode has no client id: start it with --node-config 'client-id=<k>'")
    return int(context.node_config["client-id"])


def _my_client(context: Context):
    """(cfg, this node's client data): the node's 'client-id' picks its client of the scenario."""
    cfg = config_from(context.run_config)
    cid = _claimed_id(context)
    cfg, clients = load_clients(replace(cfg, clients=[cid]))
    if not clients:
        raise ValueError(f"client-id {cid}: no such client in scenario {cfg.scenario}")
    return cfg, clients[0]


def _prepare(context: Context, conf):
    """The backbone with Θ^l installed and this client's encoded data (H_v from the feature cache
    when it has them), after checking that the server's roster describes this node's data."""
    cfg, c = _my_client(context)
    if (int(conf["client"]), str(conf["task"]), int(conf["n_train"])) != (c.id, c.task, len(c.train)):
        raise RuntimeError(f"the server's roster has client {int(conf['client'])} as a {conf['task']} client with "
                           f"{int(conf['n_train'])} training samples; this node holds client {c.id}, {c.task}, "
                           f"{len(c.train)} samples: check the manifest or scenario on both hosts")
    torch.manual_seed(cfg.seed)
    bb, _, _ = load_model(cfg, log=lambda *a: None)
    return cfg, bb, features.prepare_client(bb, c, cfg.device, cfg.max_length, log, cfg.features, cfg.features_max_mb)


def _state_file(context: Context, cid, token) -> Path:
    """Where this node keeps client cid's private state for the run `token` (node-config
    'state-dir', default $PILOT_CACHE/node-state): it outlives the ClientApp and SuperNode
    processes, so a restarted SuperNode or a resumed ServerApp continues from it."""
    root = context.node_config.get("state-dir") or backbone.cache_root() / "node-state"
    return Path(str(root)).expanduser() / f"client_{cid}-run_{token}.safetensors"


def _private_before(path: Path, r, accepted) -> tuple:
    """(ψ_s, ψ^c, φ as client enters round r, the round they come from). The state the client's
    round r − 1 produced waits in 'pending' until the server's verdict on that round's upload
    (accepted): kept if so, dropped if not (client.settle_private, as in run.py). A pending state of
    any other round is dropped: it comes from a round the server is repeating after a restart."""
    if not path.exists():
        return {}, -1
    groups, meta = checkpoint.load_state(path)
    private, p_round = groups.get("private", {}), int(meta["private_round"])
    if p_round >= r:
        raise checkpoint.CheckpointError(f"{path}: holds this client's state after round {p_round + 1}, but the "
                                         f"server is at round {r + 1}: it resumed from an older checkpoint")
    if int(meta["pending_round"]) == r - 1 and accepted:
        return groups.get("pending", {}), r - 1
    return private, p_round


@client_app.query()
def query(msg: Message, context: Context):
    # the node's claim; the server decides from its roster whether this node may serve that client
    return Message(RecordDict({"client": ConfigRecord({"id": _claimed_id(context)})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context):
    t0 = time.time()
    conf = msg.content["config"]
    cfg, bb, ct = _prepare(context, conf)
    t1 = time.time()
    r = int(conf["round"])
    path = _state_file(context, ct.id, str(conf["run"]))
    private, p_round = _private_before(path, r, bool(conf["accepted"]))
    download = dict(msg.content["download"].to_torch_state_dict())
    fault = fault_for(parse_faults(cfg.faults), ct.id, r)    # keyed by client id, as in run.py
    up, pending, st = client_step(bb, ct, download, private, int(conf["stage"]), list(conf["tasks"]), cfg, r,
                                  fault, log_bar=False)
    checkpoint.save_state(path, {"private": private, "pending": pending},
                          {"private_round": p_round, "pending_round": r})
    if up is None:
        raise RuntimeError(f"client {ct.id} failed in round {r + 1} (fault injection: drop)")
    # the time spent loading the backbone and the client's data (each message is a fresh ClientApp
    # process) and the time spent training: the server logs both beside the round's wall time
    metrics = {**{k: float(v) for k, v in st.items()}, "prepare_s": t1 - t0, "train_s": time.time() - t1}
    return Message(RecordDict({"upload": ArrayRecord(up), "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context):
    conf = msg.content["config"]
    cfg, bb, ct = _prepare(context, conf)
    r = int(conf["round"])
    path = _state_file(context, ct.id, str(conf["run"]))
    private, p_round = _private_before(path, r, bool(conf["accepted"]))
    checkpoint.save_state(path, {"private": private}, {"private_round": p_round, "pending_round": -1})
    download = dict(msg.content["download"].to_torch_state_dict())
    row = evaluation.evaluate_client(bb, ct, download, private, int(conf["stage"]), list(conf["tasks"]), cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report.save_client_state(out, ct.id, download, private)      # the client's own directory
    return Message(RecordDict({"row": ConfigRecord({"json": json.dumps(row)})}), reply_to=msg)


# ----------------------------------------------------------------------------- server side
server_app = ServerApp()


def _exchange(grid: Grid, nodes, message_type, contents, group, timeout=None):
    """Send contents[i] to nodes[i], wait for every reply; returns the replies in node order, None
    where a node answered with an error (a client that failed) or not at all."""
    msgs = [Message(c, dst_node_id=node, message_type=message_type, group_id=group) for node, c in zip(nodes, contents)]
    by_node = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)}
    out = []
    for node in nodes:
        r = by_node.get(node)
        if r is None or r.has_error():
            log(f"  node {node}: no usable reply ({r.error.reason if r is not None else 'none'})")
            out.append(None)
        else:
            out.append(r)
    return out


def key_fingerprint(key: bytes) -> str:
    """SHA-256 of a public key's DER form (SubjectPublicKeyInfo), from OpenSSH or PEM text: the
    same key gives the same fingerprint in either format (`flwr supernode register` takes the
    OpenSSH file, the SuperLink reports PEM)."""
    from cryptography.hazmat.primitives import serialization
    key = key.strip()
    loaded = serialization.load_pem_public_key(key) if key.startswith(b"-----") else serialization.load_ssh_public_key(key)
    der = loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def read_roster_keys(path) -> dict:
    """{client index: key fingerprint} from a roster file {"clients": {"<index>": "<public key file>"}}
    (key paths relative to the roster file): which SuperNode key may serve which client."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
        keys = {int(k): key_fingerprint((path.parent / v).read_bytes()) for k, v in spec["clients"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"roster {path}: expected {{\"clients\": {{\"<client index>\": \"<public key file>\"}}}} "
                         f"with readable OpenSSH or PEM public keys ({type(e).__name__}: {e})") from None
    return keys


def refusal(claim, fingerprint, roster_ids, keys, node_of):
    """Why a node claiming client `claim` with key `fingerprint` may not serve it (None: admitted)."""
    if claim not in roster_ids:
        return f"claims client {claim}, which this run does not have"
    if keys is not None and keys.get(claim) != fingerprint:
        return f"claims client {claim}, but its key {fingerprint[:23]} is not the roster's key for client {claim}"
    if claim in node_of:
        return f"claims client {claim}, which node {node_of[claim]} already serves"
    return None


def admit_nodes(grid: Grid, roster_ids, keys):
    """The node of each roster client, in roster order. Every node that connects is asked which
    client it holds; it is admitted when the roster has that client, no other node serves it and
    (with a roster file) its authenticated key is the one the roster names. Refused nodes are
    logged with the reason and never sent anything else; the server waits for the right ones, up
    to NODE_WAIT_S."""
    node_of, refused, t = {}, {}, time.time()
    while len(node_of) < len(roster_ids):
        if time.time() - t > NODE_WAIT_S:
            raise RuntimeError(f"clients {sorted(set(roster_ids) - set(node_of))} had no admissible SuperNode within "
                               f"{NODE_WAIT_S} s; refused: {refused or 'none'}")
        infos = {n.node_id: n for n in grid.get_nodes()}
        new = sorted(i for i in infos if i not in node_of.values() and i not in refused)
        if not new:
            time.sleep(1)
            continue
        for node, reply in zip(new, _exchange(grid, new, MessageType.QUERY, [RecordDict() for _ in new], "query",
                                              timeout=QUERY_TIMEOUT_S)):
            if reply is None:
                refused[node] = "did not answer which client it holds"
                continue
            claim = int(reply.content["client"]["id"])
            fp = key_fingerprint(infos[node].public_key) if infos[node].public_key else "none"
            why = refusal(claim, fp, roster_ids, keys, node_of)
            if why:
                refused[node] = why
                log(f"node {node} refused: {why}")
            else:
                node_of[claim] = node
                log(f"node {node} admitted as client {claim}" + (f" (key {fp[:23]})" if keys is not None else ""))
    return [node_of[k] for k in roster_ids]


class Fleet:
    """The fleet (federation.Fleet) federate drives on Flower: one admitted SuperNode per client of the roster.
    It trains and evaluates by messages; each client keeps its private state on its own host, so
    the server checkpoints only whether each client's last upload was accepted (the client settles
    its pending state by it) and the token that names this run's state files on the nodes."""
    engine = "flower"

    def __init__(self, grid: Grid, cfg: Config, nodes, ids, tasks_of, n, index=None):
        self.grid, self.cfg, self.nodes, self.ids, self.tasks_of, self.n = grid, cfg, nodes, ids, tasks_of, n
        self.index = list(ids) if index is None else index    # what each node claims: its scenario or manifest index
        self.tasks = sorted(set(tasks_of), key=data.TASKS.index)
        self.accepted = [True] * len(ids)   # whether each client's last upload was used (its private state follows)
        self.token = secrets.token_hex(6)    # names the clients' state files of this run (and of its resumptions)

    def state(self):
        return {}

    def turn_state(self, k):
        return {}

    def progress(self):
        return {"accepted": self.accepted, "token": self.token}

    def restore(self, groups, progress):
        self.accepted, self.token = progress["accepted"], progress["token"]

    def _contents(self, r, stage, downloads):
        return [RecordDict({"download": ArrayRecord(downloads[k]),
                            "config": ConfigRecord({"round": r, "stage": stage, "tasks": self.tasks, "run": self.token,
                                                    "client": self.index[k], "task": self.tasks_of[k], "n_train": self.n[k],
                                                    "accepted": self.accepted[k]})})
                for k in range(len(self.ids))]

    def train(self, r, stage, downloads, uploads, done, turn):
        # every client at once, as Flower sends them; a round interrupted part-way is sent again whole
        log(f"round {r + 1}/{self.cfg.rounds_stage1 + self.cfg.rounds_stage2}: sent to {len(self.ids)} clients")
        replies = _exchange(self.grid, self.nodes, MessageType.TRAIN, self._contents(r, stage, downloads), str(r + 1))
        for k, m in enumerate(replies):
            uploads[k] = dict(m.content["upload"].to_torch_state_dict()) if m else None
        stats = [dict(m.content["metrics"]) for m in replies if m]
        note = (f" (slowest client: {max((st['prepare_s'] for st in stats), default=0):.1f} s loading, "
                f"{max((st['train_s'] for st in stats), default=0):.1f} s training)")
        return stats, note

    def settle(self, accepted):
        self.accepted = accepted

    def evaluate(self, downloads, stage, scores=True):
        rounds = self.cfg.rounds_stage1 + self.cfg.rounds_stage2
        replies = _exchange(self.grid, self.nodes, MessageType.EVALUATE, self._contents(rounds, stage, downloads),
                            "evaluate")
        if not all(replies):
            raise RuntimeError("a client failed its evaluation; see the log above")
        return [json.loads(m.content["row"]["json"]) for m in replies]

    def save(self, out, downloads):
        pass        # each client wrote its own OUT/client_<id>.safetensors when it was evaluated


@server_app.main()
def main(grid: Grid, context: Context):
    t0 = time.time()
    cfg = with_defaults(config_from(context.run_config), log)
    out, lock, saved = open_out(cfg, f"runs/flower-{cfg.scenario}-{cfg.method}-seed{cfg.seed}")
    torch.manual_seed(cfg.seed)
    _, theta0, expected = load_model(cfg, log=lambda *a: None)   # Θ^l_0 and the upload shapes
    if saved:
        torch.set_rng_state(torch.tensor(saved[0]["rng"], dtype=torch.uint8))

    # The roster is the server's: ids, tasks and sample counts from the scenario or the manifest on
    # this host; with a roster file, also the key of the SuperNode that may serve each client.
    roster = llava.roster(cfg.scenario, cfg.data, cfg.clients, cfg.n_train)
    index, ids, tasks_of, n = ([r[i] for r in roster] for i in range(4))
    keys = read_roster_keys(context.run_config["roster"]) if context.run_config.get("roster") else None
    if keys is None:
        log("no roster file (run config 'roster'): each SuperNode's client-id is taken on trust; "
            "use this on a closed network only")
    elif set(index) - set(keys):
        raise ValueError(f"roster {context.run_config['roster']}: no key for clients {sorted(set(index) - set(keys))}")
    fleet = Fleet(grid, cfg, admit_nodes(grid, index, keys), ids, tasks_of, n, index)
    log(recipe_line(cfg))
    log(f"scenario {cfg.scenario}, method {cfg.method}, seed {cfg.seed}: clients {ids} on nodes {fleet.nodes}, "
        f"tasks {fleet.tasks}, train sizes {n}")
    try:
        federate(cfg, fleet, theta0, expected, out, saved, log, t0)
    finally:
        lock.close()
