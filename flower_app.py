"""
Pilot across machines on Flower (optional: pip install -r requirements-flower.txt). The same client
and server steps as run.py, carried by Flower's deployment engine instead of a Python loop:

    flower-superlink --insecure                                   # the server's host
    flower-supernode --insecure --superlink HOST:8000 --node-config "client-id=0"   # one per client
    flwr run . pilot-local --stream -c 'clients="0,2" rounds-stage1=1 rounds-stage2=1'

README.md, "Running across machines", has the whole recipe (TLS, loopback, the CLI's config.toml).

Who holds what:
    server (ServerApp)  Θ^l_0, every client's current download, the aggregation (run.server_step)
    client (ClientApp)  its data and H_v, its private ψ_s, ψ^c, φ (in context.state, never in a
                        message); it receives only the global task adapters and its own Θ̄^l_k
Messages: QUERY (which client, task and sample count a node holds), TRAIN (download + round and
stage -> upload), EVALUATE (final download -> the client's results row; the client also writes its
OUT/client_<id>.safetensors, as run.py does).

Pilot sends each client its own Θ̄^l_k, so the server drives the rounds itself (@app.main() with
the Grid) rather than through a Strategy, whose configure_train sends one model to all.
"""
import json
import time
from dataclasses import asdict, fields, replace
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

import data
import faults
import report
import run

NODE_WAIT_S = 300        # how long the server waits for every client's SuperNode to connect


def log(msg):
    flwr_log(INFO, msg)


# ----------------------------------------------------------------------------- configuration
# [tool.flwr.app.config] uses run.py's flag names; TOML has no None, so 0 / "" stand for "default".
OPTIONAL = {"clients", "n_train", "n_test", "lora_r", "lora_alpha", "top_m"}
PRESET = {"rounds_stage1", "rounds_stage2", "local_steps"}     # -1: the backbone's preset (0 is a real value)


def config_from(run_config) -> run.Config:
    """run.Config from Flower's run config (keys as run.py's flags: 'rounds-stage1', 'top-m', ...)."""
    known = {f.name for f in fields(run.Config)}
    kw = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"pyproject.toml [tool.flwr.app.config]: unknown key {key!r}")
        if name in OPTIONAL and value in (0, "") or name in PRESET and value == -1:
            value = None
        elif name == "clients":
            value = [int(x) for x in str(value).split(",")]
        kw[name] = value
    cfg = run.Config(**kw)
    run.check_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- client side
client_app = ClientApp()


def _my_client(context: Context):
    """(cfg, this node's client data): the node's 'client-id' picks its client of the scenario."""
    cfg = config_from(context.run_config)
    if "client-id" not in context.node_config:
        raise ValueError("this SuperNode has no client id: start it with --node-config 'client-id=<k>'")
    cid = int(context.node_config["client-id"])
    cfg, clients = run.load_clients(replace(cfg, clients=[cid]))
    if not clients:
        raise ValueError(f"client-id {cid}: no such client in scenario {cfg.scenario}")
    return cfg, clients[0]


def _prepare(context: Context):
    """The backbone with Θ^l installed and this client's encoded data (H_v computed once)."""
    cfg, c = _my_client(context)
    torch.manual_seed(cfg.seed)
    bb, _, _ = run.load_model(cfg, log=lambda *a: None)
    return cfg, bb, run.prepare_client(bb, c, cfg.device, cfg.max_length, log)


def _private(context: Context, accepted: bool) -> dict:
    """ψ_s, ψ^c, φ: kept in the node's context.state between rounds, never sent. The state the last
    round's training produced waits in 'pending' until the server's next message says whether that
    round's upload was accepted: kept if so, dropped if not (run.settle_private, as in run.py)."""
    if "pending" in context.state:
        if accepted:
            context.state["private"] = context.state["pending"]
        del context.state["pending"]
    return dict(context.state["private"].to_torch_state_dict()) if "private" in context.state else {}


@client_app.query()
def query(msg: Message, context: Context):
    _, c = _my_client(context)
    return Message(RecordDict({"client": ConfigRecord({"id": c.id, "task": c.task, "n_train": len(c.train)})}),
                   reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context):
    t0 = time.time()
    cfg, bb, ct = _prepare(context)
    t1 = time.time()
    conf = msg.content["config"]
    download = dict(msg.content["download"].to_torch_state_dict())
    fault = faults.fault_for(faults.parse_faults(cfg.faults), int(conf["k"]), int(conf["round"]))  # keyed like run.py's
    up, private, st = run.client_step(bb, ct, download, _private(context, bool(conf["accepted"])), int(conf["stage"]),
                                      list(conf["tasks"]), cfg, int(conf["round"]), fault, log_bar=False)
    context.state["pending"] = ArrayRecord(private)
    if up is None:
        raise RuntimeError(f"client {ct.id} failed in round {int(conf['round']) + 1} (fault injection: drop)")
    # the time spent loading the backbone and encoding the data (each message is a fresh ClientApp
    # process) and the time spent training: the server logs both beside the round's wall time
    metrics = {**{k: float(v) for k, v in st.items()}, "prepare_s": t1 - t0, "train_s": time.time() - t1}
    return Message(RecordDict({"upload": ArrayRecord(up), "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context):
    cfg, bb, ct = _prepare(context)
    conf = msg.content["config"]
    download, private = dict(msg.content["download"].to_torch_state_dict()), _private(context, bool(conf["accepted"]))
    row = run.evaluate_row(bb, ct, download, private, int(conf["stage"]), list(conf["tasks"]), cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report.save_client_state(out, ct.id, download, private)      # the client's own directory
    return Message(RecordDict({"row": ConfigRecord({"json": json.dumps(row)})}), reply_to=msg)


# ----------------------------------------------------------------------------- server side
server_app = ServerApp()


def _exchange(grid: Grid, nodes, message_type, contents, group):
    """Send contents[i] to nodes[i], wait for every reply; returns the replies in node order, None
    where a node answered with an error (a client that failed)."""
    msgs = [Message(c, dst_node_id=node, message_type=message_type, group_id=group) for node, c in zip(nodes, contents)]
    by_node = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs)}
    out = []
    for node in nodes:
        r = by_node.get(node)
        if r is None or r.has_error():
            log(f"  node {node}: no usable reply ({r.error.reason if r is not None else 'none'})")
            out.append(None)
        else:
            out.append(r)
    return out


def _wait_for_nodes(grid: Grid, k):
    t = time.time()
    while len(nodes := sorted(grid.get_node_ids())) < k:
        if time.time() - t > NODE_WAIT_S:
            raise RuntimeError(f"only {len(nodes)} of {k} SuperNodes connected within {NODE_WAIT_S} s")
        time.sleep(1)
    return nodes


@server_app.main()
def main(grid: Grid, context: Context):
    t0 = time.time()
    cfg = run.with_defaults(config_from(context.run_config), log)
    method = run.METHODS[cfg.method]
    out = Path(cfg.out or f"runs/flower-{cfg.scenario}-{cfg.method}-seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    _, theta0, expected = run.load_model(cfg, log=lambda *a: None)   # Θ^l_0 and the upload shapes

    # Who is who: each node names its client; clients then go in client-id order, as in run.py.
    K = run.federation_size(cfg)
    nodes = _wait_for_nodes(grid, K)
    info = _exchange(grid, nodes, MessageType.QUERY, [RecordDict() for _ in nodes], "query")
    found = sorted((int(r.content["client"]["id"]), node, r.content["client"]) for node, r in zip(nodes, info) if r)
    if cfg.clients is not None:
        found = [f for f in found if f[0] in cfg.clients]
    if len(found) != K or len({f[0] for f in found}) != K:
        raise RuntimeError(f"expected {K} distinct clients, the SuperNodes hold {[f[0] for f in found]}")
    node_of = [node for _, node, _ in found]
    tasks_of, n = [str(c["task"]) for _, _, c in found], [int(c["n_train"]) for _, _, c in found]
    tasks = sorted(set(tasks_of), key=data.TASKS.index)
    log(f"scenario {cfg.scenario}, method {cfg.method}, seed {cfg.seed}: clients {[f[0] for f in found]} on nodes "
        f"{node_of}, tasks {tasks}, train sizes {n}")

    communicates = method.text_agg != "none"
    downloads = [dict(theta0) for _ in range(K)]
    bytes_up, bytes_down = 0, sum(report.nbytes(d) for d in downloads) if communicates else 0
    rounds = cfg.rounds_stage1 + cfg.rounds_stage2

    accepted = [True] * K     # whether each client's last upload was used (its private state follows)

    def contents(r, stage):
        return [RecordDict({"download": ArrayRecord(downloads[k]),
                            "config": ConfigRecord({"round": r, "stage": stage, "tasks": tasks, "k": k,
                                                    "accepted": accepted[k]})})
                for k in range(K)]

    for r in range(rounds):
        stage, tr = run.stage_of(cfg, r), time.time()
        replies = _exchange(grid, node_of, MessageType.TRAIN, contents(r, stage), str(r + 1))
        uploads = [dict(m.content["upload"].to_torch_state_dict()) if m else None for m in replies]
        downloads, accepted = run.server_step(uploads, downloads, tasks_of, n, expected, cfg, log)
        ru = sum(report.nbytes(u) for u in uploads if u is not None) if communicates else 0
        rd = sum(report.nbytes(d) for d in downloads) if communicates else 0
        bytes_up, bytes_down = bytes_up + ru, bytes_down + rd
        metrics = [m.content["metrics"] for m in replies if m]
        losses = [m["loss_last"] for m in metrics]
        log(f"round {r + 1}/{rounds} (stage {stage}): mean last loss {sum(losses) / max(1, len(losses)):.3f}, "
            f"up {ru / 1e6:.2f} MB, down {rd / 1e6:.2f} MB, {time.time() - tr:.1f} s (slowest client: "
            f"{max((m['prepare_s'] for m in metrics), default=0):.1f} s loading, "
            f"{max((m['train_s'] for m in metrics), default=0):.1f} s training)")

    stage = run.final_stage(cfg)
    replies = _exchange(grid, node_of, MessageType.EVALUATE, contents(rounds, stage), "evaluate")
    if not all(replies):
        raise RuntimeError("a client failed its evaluation; see the log above")
    rows = [json.loads(m.content["row"]["json"]) for m in replies]
    per_task, average = report.summarise_rows(rows, tasks)
    per_task_ce, average_ce = report.summarise_rows(rows, tasks, "test_ce", 4)
    res = {"scenario": cfg.scenario, "seed": cfg.seed, "method": cfg.method, "backbone": cfg.backbone,
           "engine": "flower", "clients": rows, "per_task": per_task, "average": average,
           "per_task_ce": per_task_ce, "average_ce": average_ce,
           "bytes_up": bytes_up, "bytes_down": bytes_down, "wall_s": round(time.time() - t0, 1),
           "rounds": [{"round": rounds, "per_task": per_task, "average": average}], "config": asdict(cfg)}
    report.write_results(out, res, log)
