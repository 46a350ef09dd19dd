"""
Ask a trained client's personalised model about an image: the counterpart of run.py's training, as
nanoGPT's sample.py is of its train.py.

    python ask.py runs/scenario-A-pilot-seed0 --client 2 --image cat.png --question "what colour is the circle?"
    python ask.py OUT --client 2 --data test.json [--image-folder DIR]   # every record of a LLaVA-format file

The model is rebuilt exactly as the run's final evaluation built it: the backbone and settings from
OUT/results.json's config (the LoRA text adapter installed with the run's seed), then client k's
state from OUT/client_<k>.safetensors — what it downloaded last (its personalised Θ̄^l_k and the
global task adapters) and its private ψ_s, ψ^c, φ — in the connector of the run's last stage.
With --data, answers go to a JSON Lines file beside the input (<input>.client<k>.answers.jsonl:
id, question, reference answer, prediction per line); with --image, the answer is printed.
A separate script rather than a run.py subcommand: it trains nothing and needs none of run.py's
flags, only OUT and a client.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import data
import evaluate
import features
import llava
from config import Config, final_stage
from federation import load_model


class AskError(ValueError):
    """A bad OUT, client id or input; the message says which and why."""


def load_run(out):
    """(config.Config, results.json's content) of a finished run in OUT."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise AskError(f"{out}: no results.json here (not the output directory of a finished run.py run)")
    try:
        res = json.loads(path.read_text())
        cfg = Config(**res["config"])
        if not all("id" in c and "task" in c for c in res["clients"]):
            raise KeyError("a client row without 'id' or 'task'")
    except (ValueError, KeyError, TypeError) as e:
        raise AskError(f"{path}: not a results.json written by run.py ({type(e).__name__}: {e})") from None
    return cfg, res


def load_client(out, cfg, res, client):
    """(task, the run's task list, download, private state) of client `client` (its id in results.json)."""
    known = {str(c["id"]): c["task"] for c in res["clients"]}
    if str(client) not in known:
        raise AskError(f"{out}: no client {client!r} in this run; its clients are {', '.join(known)}")
    path = Path(out) / f"client_{client}.safetensors"
    if not path.is_file():
        raise AskError(f"{path}: missing (the run's final state of client {client})")
    state = load_file(str(path))
    private = {k[len("private."):]: v for k, v in state.items() if k.startswith("private.")}
    download = {k: v for k, v in state.items() if not k.startswith("private.")}
    tasks = sorted(set(known.values()), key=data.TASKS.index)
    return known[str(client)], tasks, download, private


class Model:
    """A client's model, rebuilt as run.py's final evaluation built it; .ask(samples) answers."""

    def __init__(self, out, client, log=lambda *a: None):
        cfg, res = load_run(out)
        self.cfg = cfg
        self.task, tasks, download, private = load_client(out, cfg, res, client)
        torch.manual_seed(cfg.seed)
        self.bb, _, _ = load_model(cfg, log)
        self.conn = evaluate.client_model(self.bb, self.task, download, private, final_stage(cfg), tasks, cfg)

    def ask(self, samples):
        """Greedy answers to data.Samples (image: a tensor, an image path or a PIL image)."""
        bb = self.bb
        h_v = torch.cat(list(features.encode(bb, samples, bb.model.device)))
        prompts = [bb.encode(s, self.cfg.max_length)[0][0] for s in samples]
        return evaluate.answer(bb, self.conn, self.task, h_v, prompts, self.cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Ask a trained client's model about an image (see the docstring).")
    ap.add_argument("out", help="a finished run's output directory (results.json, client_<k>.safetensors)")
    ap.add_argument("--client", required=True, help="the client's id, as in results.json")
    ap.add_argument("--image", help="an image file")
    ap.add_argument("--question", help="the question about --image")
    ap.add_argument("--data", help="a LLaVA-format JSON file: answer every record")
    ap.add_argument("--image-folder", help="where --data's image paths start (default: the file's folder)")
    a = ap.parse_args(argv)
    if bool(a.data) == bool(a.image) or (a.image and not a.question):
        ap.error("give either --image with --question, or --data")
    try:
        model = Model(a.out, a.client)
        if a.image:
            sample = data.Sample(llava.open_image(a.image), a.question, "", model.task, id=a.image)
            print(model.ask([sample])[0])
            return
        src = Path(a.data)
        samples = llava.load_llava_records(src, Path(a.image_folder or src.parent), model.task, split="test")
        preds = model.ask(samples)
        dest = src.with_name(f"{src.stem}.client{a.client}.answers.jsonl")
        dest.write_text("".join(json.dumps({"id": s.id, "question": s.question, "answer": s.answer, "prediction": p})
                                + "\n" for s, p in zip(samples, preds)))
        print(f"wrote {len(preds)} answers to {dest}")
    except (AskError, llava.DataError) as e:
        print(f"ask.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    main()
