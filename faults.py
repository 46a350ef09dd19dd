"""
Fault injection, for tests and robustness experiments: what a client's upload becomes when the
client misbehaves. The server's defences (upload validation, the update-norm screen) are in
run.screen_uploads; what a rejected client keeps is run.settle_private.

    python run.py --scenario A --faults client=3:nan          # every round
    python run.py --scenario A --faults client=3:scale=100@2  # round 2 only

Faults are keyed by the client's position among the clients of the run (0-based).
"""
import pilot


def apply_fault(fault, upload, download, task):
    """Fault injection (tests, robustness runs): 'nan' poisons the upload, 'scale=X' multiplies the
    client's update by X, 'drop' loses it (the client crashed)."""
    if fault is None:
        return upload
    if fault == "drop":
        return None
    if fault == "nan":
        bad = dict(upload)
        key = next(iter(bad))
        bad[key] = bad[key].clone()
        bad[key].view(-1)[0] = float("nan")
        return bad
    if fault.startswith("scale="):
        x = float(fault.split("=", 1)[1])
        ref = {**{k: v for k, v in download.items() if k.startswith("lora.")},
               **{"task_adapter." + k: v for k, v in pilot.sub_state(download, f"global_task_adapter.{task}.").items()}}
        return {k: ref[k] + x * (v - ref[k]) if k in ref else v for k, v in upload.items()}
    raise ValueError(f"unknown fault {fault!r}; expected nan, drop or scale=X")


def parse_faults(text):
    """'client=3:nan,client=1:scale=100@2' -> {3: ('nan', None), 1: ('scale=100', 2)}: a fault in
    every round, or only in the round after '@' (1-based)."""
    faults = {}
    for part in filter(None, (text or "").split(",")):
        who, _, what = part.partition(":")
        what, at, when = what.partition("@")
        ok = who.startswith("client=") and who[7:].isdigit() and (not at or when.isdigit())
        ok = ok and (what in ("nan", "drop") or what.startswith("scale="))
        if ok and what.startswith("scale="):
            try:
                float(what[6:])
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"--faults {part!r}: expected client=<k>:nan|drop|scale=<x>, optionally @<round>")
        faults[int(who[7:])] = (what, int(when) if at else None)
    return faults


def fault_for(faults, k, round_idx):
    """The fault client k has in round round_idx (0-based), or None."""
    what, when = faults.get(k, (None, None))
    return what if when is None or when == round_idx + 1 else None
