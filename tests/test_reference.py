"""The implementation against the reference vectors of tests/reference/ (float64 computations of
docs/METHOD.md's equations, written out independently in tests/reference/generate.py): inputs
cast to fp32, outputs checked within each case's stated tolerance (rtol 1e-4, atol 1e-5)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import aggregate
import client
import pilot
import server
from config import METHODS, Config

REF = Path(__file__).resolve().parent / "reference"
INDEX = json.loads((REF / "index.json").read_text())["cases"]
VECTORS = load_file(str(REF / "vectors.safetensors"))


def _case(name):
    """(fp32 inputs, float64 expected outputs, settings, check) of one case."""
    c = INDEX[name]
    inputs = {k: VECTORS[f"{name}/{k}"].float() for k in c["inputs"]}
    outputs = {k: VECTORS[f"{name}/{k}"] for k in c["outputs"]}

    def check(key, got):
        torch.testing.assert_close(got.double(), outputs[key], rtol=c["rtol"], atol=c["atol"], msg=f"{name}: {key}")
    return inputs, outputs, c["settings"], check


def _clients(inputs):
    """{'client<k>.<key>': v} -> [{key: v}, ...] in client order."""
    K = 1 + max(int(k.split(".")[0][6:]) for k in inputs)
    return [{k.split(".", 1)[1]: v for k, v in inputs.items() if k.split(".")[0] == f"client{j}"} for j in range(K)]


def test_every_case_is_checked_and_the_conventions_stated_once():
    assert set(INDEX) == {"lora", "stage1", "router_losses", "ctmoa", "task_aware_visual", "ata_ties", "ata", "fedavg",
                          "ata_near", "trajectory", "ata_threshold"}
    conventions = json.loads((REF / "index.json").read_text())["conventions"]
    assert {"gelu", "router_order", "stacked_experts", "ata_identical", "ata_zero_distance", "ata_lambda", "ata_outputs",
            "zero_last_layer"} <= set(conventions)
    # the implementation's own constants are the ones stated
    assert "1e-6" in conventions["ata_identical"] and "1e-6" in aggregate.pairwise_distances.__doc__ + \
        __import__("inspect").getsource(aggregate.pairwise_distances)
    assert torch.nn.functional.gelu(torch.tensor(1.0)).item() == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))))


def test_lora():
    x, _, s, check = _case("lora")
    base = nn.Linear(6, 5)
    base.load_state_dict({"weight": x["weight"], "bias": x["bias"]})
    lora = pilot.LoRALinear(base, s["r"], s["alpha"])
    with torch.no_grad():
        lora.lora_A.copy_(x["lora_A"])
        lora.lora_B.copy_(x["lora_B"])
    check("y", lora(x["x"]))


def test_stage1_connector_and_difference_loss():
    x, _, s, check = _case("stage1")
    conn = pilot.Stage1Connector(4, 5, True, s["lambda_d"])
    conn.load_state_dict({k: v for k, v in x.items() if k != "h_v"})
    x_img, aux = conn(x["h_v"])
    check("x_img", x_img)
    check("aux", aux)
    check("l_d", pilot.difference_loss(conn.task_adapter(x["h_v"]), conn.client_adapter(x["h_v"])))


def test_router_losses():
    x, _, _, check = _case("router_losses")
    l_b, l_z = pilot.router_losses(x["logits"])
    check("l_b", l_b)
    check("l_z", l_z)


def test_ctmoa_connector():
    x, _, s, check = _case("ctmoa")
    conn = pilot.CTMoAConnector(4, 5, s["n_tasks"], True, s["lambda_b"], s["lambda_z"])
    with torch.no_grad():
        for key, v in x.items():
            if key.startswith(("task_adapter.", "client_adapter.", "router.")):
                conn.get_parameter(key).copy_(v)
        # the implementation keeps the stacked experts' second layer input-major (see pilot.mixture)
        conn.foreign_w1.copy_(x["foreign.linear_1.weight"])
        conn.foreign_b1.copy_(x["foreign.linear_1.bias"])
        conn.foreign_w2.copy_(x["foreign.linear_2.weight"].transpose(1, 2))
        conn.foreign_b2.copy_(x["foreign.linear_2.bias"])
        ca = conn.cross_adapter
        ca["w1"].copy_(x["cross.linear_1.weight"])
        ca["b1"].copy_(x["cross.linear_1.bias"])
        ca["w2"].copy_(x["cross.linear_2.weight"].transpose(1, 2))
        ca["b2"].copy_(x["cross.linear_2.bias"])
    x_img, aux = conn(x["h_v"])
    check("x_img", x_img)
    check("aux", aux)


def test_task_aware_visual_aggregation():
    x, out, s, check = _case("task_aware_visual")
    got = aggregate.task_aware_visual(_clients(x), s["tasks"], s["n"])
    assert set(got) == {"caption", "vqa"}
    for key in out:
        task, name = key.split(".", 1)
        check(key, got[task][name])


@pytest.mark.parametrize("name", ["ata_ties", "ata", "ata_near", "ata_threshold"])
def test_ata_distances_mixing_matrix_and_outputs(name):
    x, out, s, check = _case(name)
    states = _clients(x)
    d = aggregate.pairwise_distances(states)
    check("distances", d)
    A = aggregate.ata_matrix(d, s["n"], s["top_m"])
    check("mixing", A)
    # the neighbour sets (including ties and the zero distance) are exactly the reference's
    assert torch.equal(A != 0, out["mixing"] != 0)
    mixed, _, _ = aggregate.adaptive_text(states, s["n"], s["top_m"])
    for k, m in enumerate(mixed):
        for key, v in m.items():
            check(f"out{k}.{key}", v)


def test_fedavg():
    x, out, s, check = _case("fedavg")
    got = aggregate.fedavg(_clients(x), s["n"])
    for key in out:
        check(key, got[key.split(".", 1)[1]])


class _StandIn:
    """What client.build_connector reads of a backbone: the connector's widths and the projector."""
    def __init__(self, projector):
        self.dims = (4, 5)
        self.model = nn.Module()
        self.model.model = nn.Module()
        self.model.model.multi_modal_projector = pilot.MLPAdapter(4, 5)
        self.model.model.multi_modal_projector.load_state_dict(projector)


def test_trajectory_a_whole_federation_by_the_implementations_own_client_and_server_steps():
    """Two rounds of 3 clients through client.build_connector (stage 1, then CT-MoA), the stand-in LLM
    (one frozen linear layer with pilot's LoRA), 2 plain SGD steps on what pilot.trainable_parameters
    switches on, the upload and private state pilot.split_connector_state gives, and
    server.server_round's downloads: every tensor as the reference's float64 run, per client and round."""
    x, out, s, check = _case("trajectory")
    projector = {k[len("projector."):]: v for k, v in x.items() if k.startswith("projector.")}
    bb = _StandIn(projector)
    lm = nn.Module()
    lm.lm = nn.Linear(5, 3)
    lm.lm.load_state_dict({"weight": x["lm.weight"], "bias": x["lm.bias"]})
    pilot.install_lora(lm, s["lora_r"], s["lora_alpha"], targets=("lm",))
    theta0 = {k: x[k] for k in ("lora.lm.lora_A", "lora.lm.lora_B")}
    cfg = Config(method="pilot", lambda_d=s["lambda_d"], lambda_b=s["lambda_b"], lambda_z=s["lambda_z"])
    tasks_of, n = s["tasks"], s["n"]
    tasks = sorted(set(tasks_of), key=["caption", "vqa", "grounding", "ocr"].index)
    downloads, private = [dict(theta0) for _ in tasks_of], [{} for _ in tasks_of]
    for rnd, stage in ((1, 1), (2, 2)):
        uploads = []
        for k, task in enumerate(tasks_of):
            mine = private[k] if stage == 1 else {**private[k], **{key: x[f"client{k}.{key}"] for key in ("router.weight", "router.bias")}}
            conn = client.build_connector(bb, stage, tasks, task, downloads[k], mine, 0, cfg)
            client.load_text_adapter(lm, downloads[k])
            params = list(pilot.trainable_parameters(lm, conn).values())
            for _ in range(s["sgd_steps"]):
                x_img, aux = conn(x[f"client{k}.h_v"])
                loss = ((lm.lm(x_img) - x[f"client{k}.target"]) ** 2).mean() + aux
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p -= s["lr"] * g
            up_conn, new_private = pilot.split_connector_state(conn)
            uploads.append({**up_conn, **{key: v.detach().clone() for key, v in pilot.lora_state(lm).items()}})
            private[k] = {**private[k], **new_private}
            for key, v in uploads[k].items():
                check(f"round{rnd}/client{k}/upload/{key}", v)
            # ψ_s, and in stage 2 ψ^c (the implementation keeps its second layer input-major) and φ
            named = {"w1": "cross.linear_1.weight", "b1": "cross.linear_1.bias", "w2": "cross.linear_2.weight",
                     "b2": "cross.linear_2.bias"}
            for key, v in private[k].items():
                ref = named.get(key.split(".", 1)[1], key) if key.startswith("cross_adapter.") else key
                check(f"round{rnd}/client{k}/private/{ref}", v.transpose(1, 2) if key == "cross_adapter.w2" else v)
            assert {f"round{rnd}/client{k}/private/{k2}" for k2 in [named.get(p.split(".", 1)[1], p) if
                    p.startswith("cross_adapter.") else p for p in private[k]]} == \
                {o for o in out if o.startswith(f"round{rnd}/client{k}/private/")}
        downloads = server.server_round(uploads, tasks_of, n, s["top_m"], METHODS["pilot"])
        for k in range(len(tasks_of)):
            assert {f"round{rnd}/client{k}/download/{key}" for key in downloads[k]} == \
                {o for o in out if o.startswith(f"round{rnd}/client{k}/download/")}
            for key, v in downloads[k].items():
                check(f"round{rnd}/client{k}/download/{key}", v)
        # not a trivial case: ATA personalises Θ^l (two mutual nearest neighbours with M = 1 get the same
        # n-weighted pair average; the third client another), and stage 2 moved ψ^c from its zero last layer
        mixed = [d["lora.lm.lora_B"] for d in downloads]
        assert not all(torch.allclose(mixed[0], m) for m in mixed[1:])
    assert private[2]["cross_adapter.w2"].abs().max() > 1e-3


def test_stored_vectors_are_what_the_documented_command_generates():
    sys.path.insert(0, str(REF))
    try:
        import generate
    finally:
        sys.path.remove(str(REF))
    tensors, index = generate.build()
    assert index == INDEX and tensors.keys() == VECTORS.keys()
    for k, v in tensors.items():
        torch.testing.assert_close(v, VECTORS[k], rtol=1e-12, atol=1e-12)


def test_the_threshold_case_tells_the_plain_mean_from_the_n_weighted_one():
    """ata_threshold fails a port that centres the identical-client threshold on the n-weighted mean:
    that reading's distances and mixing lie outside the case's tolerance."""
    sys.path.insert(0, str(REF))
    try:
        import generate
    finally:
        sys.path.remove(str(REF))
    x, out, s, _ = _case("ata_threshold")
    states = [{k: v.double() for k, v in c.items()} for c in _clients(x)]
    weighted = generate.distances(states, 1e-6, weights=s["n"])
    tol = INDEX["ata_threshold"]["atol"] + INDEX["ata_threshold"]["rtol"] * out["distances"].abs()
    assert ((weighted - out["distances"]).abs() > tol).any()
    assert out["distances"][2, 3] == 0 and weighted[2, 3] > 0
