"""The implementation against the reference vectors of tests/reference/ (float64 computations of
PILOT_METHOD.md's equations, written out independently in tests/reference/generate.py): inputs
cast to fp32, outputs checked within each case's stated tolerance (rtol 1e-4, atol 1e-5)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import aggregate
import pilot

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


def test_every_case_is_checked():
    assert set(INDEX) == {"lora", "stage1", "router_losses", "ctmoa", "task_aware_visual", "ata_ties", "ata", "fedavg"}


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


@pytest.mark.parametrize("name", ["ata_ties", "ata"])
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
