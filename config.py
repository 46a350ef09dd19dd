"""
The settings of a run, in one place: Config (every field a flag of run.py), the presets that fill
its None fields (the embedded benchmark's schedule for the tiny backbone, the paper's recipe for a
LLaVA checkpoint), and the methods, as switches over one implementation.

It imports only data, llava and pilot (the definitions the checks read: scenarios, manifests, LoRA
targets), never the client, the server, the evaluation or the loop, so that all of those can import
the settings without a cycle.
"""
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import data
import llava
import pilot

# ----------------------------------------------------------------------------- presets
# Config's None fields come from the backbone's preset. "tiny": the embedded benchmark, in the
# federated-learning convention (docs/METHOD.md, "Schedule"): every client takes the same number of
# steps per round, many short rounds, one learning-rate schedule over the whole run. "real": the
# paper's recipe for a LLaVA-1.5 checkpoint (docs/METHOD.md, "The paper's recipe").
PRESETS = {
    "tiny": dict(rounds_stage1=4, rounds_stage2=16, local_steps=10, lora_r=8, lora_alpha=16.0, lr_stage1=3e-3,
                 lr_stage2=3e-3, batch_size=8, grad_accum=1, warmup_ratio=0.03, dtype="fp32", max_length=2048,
                 checkpoint="round"),
    "real": dict(rounds_stage1=1, rounds_stage2=3, local_steps=0, lora_r=64, lora_alpha=128.0, lr_stage1=2e-5,
                 lr_stage2=4e-5, batch_size=16, grad_accum=2, warmup_ratio=0.03, dtype="bf16", max_length=2048,
                 checkpoint="client"),
}
# Where each value of the "real" preset comes from: the paper, or this implementation's reading.
REAL_SOURCES = {
    "rounds_stage1": "reading: the paper's R = 3 rounds read as 1 round of stage 1, then 3 of stage 2",
    "rounds_stage2": "reading: see rounds_stage1",
    "local_steps": "paper: E = 1 local epoch per round (0: whole epochs)",
    "lora_r": "paper", "lora_alpha": "paper", "lr_stage1": "paper", "lr_stage2": "paper",
    "batch_size": "paper", "grad_accum": "paper", "max_length": "paper",
    "dtype": "paper: bf16 (on a GPU)",
    "warmup_ratio": "paper: 3% warm-up; reading: of one cosine schedule over a client's steps of the whole run",
    "checkpoint": "ours: the federation state after every client (a 7B client round is long)",
}
# On a CPU without bf16 instructions the real preset's frozen weights are fp32 unless --dtype says
# otherwise: PyTorch then converts bf16 operands instead of computing with them. A CPU with them
# (avx512_bf16 or amx_bf16) keeps the paper's bf16, which bench.py --rehearse measured faster there
# than fp32 (a LLaVA-1.5-7B-width step: README, "What a real run costs").
CPU_DTYPE_SOURCE = "ours: fp32 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16)"


def cpu_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively: avx512_bf16 or amx_bf16 among the flags
    of /proc/cpuinfo (False where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None
# The tiny preset's values are the embedded benchmark's definition (README, "The embedded benchmark").
TINY_SOURCE = "benchmark"


def is_tiny(backbone: str) -> bool:
    """The shipped tiny backbone, or another build of its recipe (a directory with pilot_backbone.json)."""
    return backbone == "tiny" or (Path(backbone) / "pilot_backbone.json").is_file()


def preset_name(backbone: str) -> str:
    return "tiny" if is_tiny(backbone) else "real"


# ----------------------------------------------------------------------------- the settings
@dataclass
class Config:
    scenario: str = "A"
    method: str = "pilot"
    seed: int = 0               # seeds the training: the adapters' initial values and the batch order
    data_seed: int = 0          # draws the synthetic world: 0, the benchmark's, whatever the seed
    backbone: str = "tiny"      # "tiny" (shipped) or a LLaVA checkpoint directory / hub id
    allow_download: bool = False   # let a hub id missing from the local cache be downloaded (nothing is, by default)
    data: str = ""              # a scenario manifest of LLaVA-format data (default: the synthetic scenario)
    out: str = ""
    device: str = "cpu"
    # the schedule and optimisation; None: the backbone's preset (PRESETS)
    rounds_stage1: int = None   # R1 [reading]: stage 1 for the first R1 rounds
    rounds_stage2: int = None   # R2: stage 2 (CT-MoA) for the next R2 rounds
    local_steps: int = None     # optimiser steps per client per round; 0: E whole epochs instead
    local_epochs: int = 1       # E, when local_steps is 0
    lr_stage1: float = None
    lr_stage2: float = None
    batch_size: int = None
    grad_accum: int = None
    warmup_ratio: float = None  # of each client's steps over the whole run (one cosine schedule, not one per round)
    grad_clip: float = 1.0      # clip each step's gradient norm to this (0: off); FL convention, HF Trainer's default
    lora_r: int = None
    lora_alpha: float = None
    lora_targets: str = ",".join(pilot.LORA_TARGETS)
    dtype: str = None           # frozen weights' dtype: fp32 or bf16 (trainable tensors stay fp32)
    max_length: int = None      # tokens; longer samples lose instruction words, never answer words
    grad_ckpt: bool = False     # gradient checkpointing in the LLM
    # the method
    top_m: int = None           # M nearest neighbours in ATA; None: min(3, K − 1) for K clients
    lambda_d: float = pilot.LAMBDA_D   # λ0, difference loss L_d (stage 1)
    lambda_b: float = pilot.LAMBDA_B   # λ1, load balance L_b (stage 2)
    lambda_z: float = pilot.LAMBDA_Z   # λ2, router z-loss L_z (stage 2)
    mu: float = 0.01            # FedProx's μ
    # evaluation
    eval_batch_size: int = 50
    eval_every_round: bool = False       # every client's score and test loss after every round
    # every client's test loss (teacher-forced) after every round, without generating answers: the
    # round-by-round curve of a comparison (about 1.2 s a round for Scenario A's 6 x 400 test samples)
    test_loss_every_round: bool = False
    # where H_v lives: "memory", "disk" (cache file, memory-mapped), "auto", or "stream" (computed per batch; features.py)
    features: str = "auto"
    features_max_mb: float = 1024.0      # "auto": a client's H_v above this many MB goes to the disk cache
    # reliability
    resume: bool = False        # continue the run checkpointed in OUT
    checkpoint: str = None      # the federation state written after every "client" or every "round"
    faults: str = ""            # fault injection, e.g. "client=3:nan", "client=3:scale=100", "client=3:drop"
    norm_screen: float = 5.0    # [our addition beyond the paper] reject updates above this x the round's median norm; 0: off
    # shrinking the scenario (tests, quick looks): None keeps the scenario's own sizes
    clients: list = None
    n_train: int = None
    n_test: int = None

    def __post_init__(self):
        if self.dtype is None and preset_name(self.backbone) == "real" and self.device == "cpu" and not cpu_bf16():
            self.dtype = "fp32"    # CPU_DTYPE_SOURCE
        for key, value in PRESETS[preset_name(self.backbone)].items():
            if getattr(self, key) is None:
                setattr(self, key, value)


def recipe(cfg: Config) -> dict:
    """The preset's settings as this run resolved them, each with where it comes from: the paper or
    our reading (a checkpoint's preset), the benchmark (the tiny one's), or a flag that overrode it.
    Printed in the log and recorded in results.json."""
    name = preset_name(cfg.backbone)
    out = {}
    for key, value in PRESETS[name].items():
        got = getattr(cfg, key)
        source = (REAL_SOURCES[key] if name == "real" else TINY_SOURCE) if got == value else "flag"
        if name == "real" and key == "dtype" and got == "fp32" and cfg.device == "cpu" and not cpu_bf16():
            source = CPU_DTYPE_SOURCE
        out[key] = {"value": got, "source": source}
    return out


def recipe_line(cfg: Config) -> str:
    r = recipe(cfg)
    return f"settings ({preset_name(cfg.backbone)} preset): " + ", ".join(
        f"{k} {v['value']}" + ("" if v["source"].startswith("paper") or v["source"] == TINY_SOURCE
                               else f" ({v['source'].split(':')[0]})")
        for k, v in r.items())


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """What a method does, as switches over one implementation (an ablation changes one field)."""
    connector: str = "pilot"        # "pilot" (stage 1 / CT-MoA connectors) or "mlp" (one plain projector-shaped MLP)
    client_adapter: bool = True     # ψ_s and L_d in stage 1 (and ψ_s in stage 2 when client_in_stage2)
    client_in_stage2: bool = True   # ψ_s (frozen) in the stage-2 sum
    ctmoa: bool = True              # stage 2 mixes all tasks' adapters; False: own task adapter only
    text_agg: str = "ata"           # Θ^l: "ata", "fedavg" (over all clients), "task" (FedAvg within each task) or "none"
    visual_agg: str = "task"        # connector: "task" (every task's average to every client), "own-task" (each
                                    # client its own task's average), "all" (FedAvg over all clients) or "none"
    prox: bool = False              # FedProx's proximal term (μ/2)||θ − θ_round_start||² (μ = --mu)
    pooled: str = ""                # a bound that trains on pooled data: "all" (one model on the union of every
                                    # client's data) or "task" (one model per task on the union of its clients')


# The bounds every table shows: Local (no collaboration), centralized-task (pooling each task's data,
# a model per task) and Centralized (pooling all the data, one model): one LoRA + plain MLP connector
# each, the pooled clients' total number of steps, scored on each client's own test set. Together they
# split a task's room into what its own clients' data give and what the other tasks' data add
# (docs/METHOD.md, "Baselines, bounds and ablations"). fedavg-task is the federation that needs no
# knowledge from other tasks: FedAvg within each task, clusters = tasks, known to the server.
METHODS = {
    "local": Method(connector="mlp", text_agg="none", visual_agg="none"),
    "centralized-task": Method(connector="mlp", text_agg="none", visual_agg="none", pooled="task"),
    "centralized": Method(connector="mlp", text_agg="none", visual_agg="none", pooled="all"),
    "fedavg": Method(connector="mlp", text_agg="fedavg", visual_agg="all"),
    "fedprox": Method(connector="mlp", text_agg="fedavg", visual_agg="all", prox=True),
    "fedavg-task": Method(connector="mlp", text_agg="task", visual_agg="own-task"),
    "pilot": Method(),
    "pilot-no-stage1": Method(client_adapter=False),
    "pilot-no-ctmoa": Method(ctmoa=False),
    "pilot-no-ata": Method(text_agg="fedavg"),
    "pilot-no-client-s2": Method(client_in_stage2=False),
}


# ----------------------------------------------------------------------------- derived settings
def federation_size(cfg: Config) -> int:
    """How many clients the run has: --clients, else the manifest's or the scenario's count."""
    if cfg.clients is not None:
        return len(cfg.clients)
    if cfg.data:
        manifest = llava.read_json(cfg.data)    # a DataError naming the file when it is not JSON
        return len(manifest.get("clients", [])) if isinstance(manifest, dict) else 0
    return len(data.SCENARIOS[cfg.scenario])


def with_defaults(cfg: Config, log=print) -> Config:
    """Settings whose default depends on the federation: ATA's M, when not given, is min(3, K − 1)
    (at least 1), so that the default fits a federation of any size; with --data, the scenario is
    the manifest's name."""
    if cfg.data:
        manifest = llava.read_json(cfg.data)
        name = manifest.get("name") if isinstance(manifest, dict) else None
        cfg = replace(cfg, scenario=name if isinstance(name, str) and name else Path(cfg.data).stem)
    if cfg.top_m is not None:
        return cfg
    k = federation_size(cfg)
    m = max(1, min(3, k - 1))
    log(f"--top-m not given: M = min(3, K - 1) = {m} for K = {k} clients")
    return replace(cfg, top_m=m)


def stage_of(cfg: Config, r: int) -> int:
    """[reading] stage 1 for the first R1 rounds, stage 2 (CT-MoA) for the next R2."""
    return 1 if r < cfg.rounds_stage1 else 2


def final_stage(cfg: Config) -> int:
    """The stage whose connector the final evaluation uses: the last round's (1 when there is none)."""
    rounds = cfg.rounds_stage1 + cfg.rounds_stage2
    return stage_of(cfg, rounds - 1) if rounds else 1


def parse_faults(text: str) -> dict:
    """'client=3:nan,client=c1:scale=100@2' -> {'3': ('nan', None), 'c1': ('scale=100', 2)}: a fault
    of the client with that id (a scenario index, or a manifest's id) in every round, or only in the
    round after '@' (1-based)."""
    faults = {}
    for part in filter(None, (text or "").split(",")):
        who, _, what = part.partition(":")
        what, at, when = what.partition("@")
        ok = who.startswith("client=") and len(who) > 7 and (not at or when.isdigit())
        ok = ok and (what in ("nan", "drop") or what.startswith("scale="))
        if ok and what.startswith("scale="):
            try:
                float(what[6:])
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"--faults {part!r}: expected client=<id>:nan|drop|scale=<x>, optionally @<round>")
        faults[who[7:]] = (what, int(when) if at else None)
    return faults


def fault_for(faults: dict, client_id, round_idx: int):
    """The fault client `client_id` has in round round_idx (0-based), or None."""
    what, when = faults.get(str(client_id), (None, None))
    return what if when is None or when == round_idx + 1 else None


def check_config(cfg: Config):
    """What can be checked before any work: raises ValueError with a one-line reason."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.scenario not in data.SCENARIOS and not cfg.data:
        raise ValueError(f"unknown scenario {cfg.scenario!r}; choose from {', '.join(data.SCENARIOS)}")
    if cfg.data and not Path(cfg.data).is_file():
        raise ValueError(f"--data {cfg.data}: no such file")
    n_clients = federation_size(cfg)
    if cfg.top_m is not None and not 1 <= cfg.top_m < max(2, n_clients):
        raise ValueError(f"--top-m {cfg.top_m}: must be at least 1 and below the number of clients ({n_clients})")
    if cfg.out and not Path(cfg.out).resolve().parent.is_dir():
        raise ValueError(f"--out {cfg.out}: the parent directory {Path(cfg.out).resolve().parent} does not exist")
    if cfg.backbone != "tiny" and Path(cfg.backbone).exists():
        conf = Path(cfg.backbone) / "config.json"
        try:
            kind = json.loads(conf.read_text()).get("model_type") if conf.is_file() else None
        except (ValueError, AttributeError):
            kind = None
        if kind != "llava":
            raise ValueError(f"--backbone {cfg.backbone}: not a LLaVA checkpoint (no config.json with model_type 'llava')")
    for key, allowed in (("dtype", ("fp32", "bf16")), ("device", ("cpu", "cuda")), ("features", ("auto", "memory", "disk", "stream")),
                         ("checkpoint", ("client", "round"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key} {getattr(cfg, key)}: expected one of {', '.join(allowed)}")
    parse_faults(cfg.faults)
