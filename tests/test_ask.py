"""ask.py: a trained client's model answers as the run's final evaluation did; clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import llava
import run
from config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(small_backbone_dir, tmp_path_factory):
    """A small Pilot run (1 + 1 rounds) on a 2-client LLaVA-format manifest of exported PNGs."""
    tmp = tmp_path_factory.mktemp("ask")
    manifest = llava.export_scenario(tmp / "data", "A", 0, limit_clients=[0, 2], n_train=8, n_test=5)
    out = tmp / "out"
    run.run(Config(data=str(manifest), rounds_stage1=1, rounds_stage2=1, local_steps=2, batch_size=4, top_m=1,
                       backbone=str(small_backbone_dir), out=str(out)), log=lambda *a: None)
    return manifest, out


def _ask(*args):
    return subprocess.run([sys.executable, "ask.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_answers_on_the_test_set_equal_the_final_evaluation(finished):
    manifest, out = finished
    m = json.loads(manifest.read_text())
    for c in m["clients"]:          # named by their manifest ids, c0 and c2, in the run's files and on ask.py's line
        test = manifest.parent / c["test"]
        p = _ask(out, "--client", c["id"], "--data", test, "--image-folder", manifest.parent / c["image_folder"])
        assert p.returncode == 0, p.stderr
        answers = [json.loads(line) for line in test.with_name(f"test.client{c['id']}.answers.jsonl").read_text().splitlines()]
        evaluated = [json.loads(line) for line in (out / f"predictions_client_{c['id']}.jsonl").read_text().splitlines()]
        assert len(answers) == len(evaluated) == 5
        assert [a["prediction"] for a in answers] == [e["prediction"] for e in evaluated]
        assert [a["id"] for a in answers] == [e["id"] for e in evaluated]


def test_one_image_and_question(finished):
    """A single question about one of client c2's test images: the evaluation's answer to it."""
    manifest, out = finished
    record = json.loads((out / "predictions_client_c2.jsonl").read_text().splitlines()[0])
    test = json.loads((manifest.parent / json.loads(manifest.read_text())["clients"][1]["test"]).read_text())
    image = manifest.parent / "images" / next(r["image"] for r in test if record["id"].startswith(r["id"] + "#"))
    p = _ask(out, "--client", "c2", "--image", image, "--question", record["question"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == record["prediction"] + "\n"


def test_clear_errors(finished, tmp_path):
    manifest, out = finished
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.json").write_text('{"accuracy": 0.9}')
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    for args, message in (
            ([tmp_path / "missing", "--client", 0, "--image", "x.png", "--question", "q"], "no results.json here"),
            ([tmp_path / "foreign", "--client", 0, "--image", "x.png", "--question", "q"], "not a results.json written by run.py"),
            ([out, "--client", 0, "--image", "x.png", "--question", "q"], "no client '0' in this run; its clients are c0, c2"),
            ([out, "--client", "c0", "--image", tmp_path / "broken.png", "--question", "q"], "broken.png cannot be read")):
        p = _ask(*args)
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
