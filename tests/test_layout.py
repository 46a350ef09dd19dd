"""The house's layout: no import cycle among the top-level modules, no module past 500 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports():
    """{module: the top-level modules it imports}, read from the source (nothing is imported)."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[name] = sorted(d for d in deps if d in mods and d != name)
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d, path + [d])
                if found:
                    return found
        state[m] = "done"
        return None
    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_import_cycle_among_the_top_level_modules():
    graph = _imports()
    assert {"run", "config", "client", "server", "evaluate", "compare", "flower_app"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # settings below everything: config imports no module that would need the settings
    assert set(graph["config"]) <= {"data", "llava", "pilot"}
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]     # the check itself


def test_no_module_past_500_lines():
    long = {p.name: n for p in ROOT.glob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


# Markdown files that are outputs, named in the docs as what a run or a comparison writes (and a
# test's own temporary document).
WRITTEN_BY_RUNS = {"results.md", "compare.md", "doc.md"}


def _tracked_text_files():
    """The repository's text files, tracked or to be (git ls-files, the ignored ones left out; a tree
    without git: every file outside the environments and outputs). This file is left out: it plants
    bad citations to check the check."""
    import subprocess
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".ci-venv", "runs", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]
    out = {}
    for name in names:
        if name == "tests/test_layout.py":
            continue
        try:
            out[name] = (ROOT / name).read_text()
        except (UnicodeDecodeError, OSError):
            pass          # weights, images
    return out


def cited_outside(files):
    """(file, what it cites) for every citation of a file a clone lacks: a path that climbs out of the
    repository (../), a markdown link to a missing file, a .md file named anywhere that the repository
    does not hold."""
    import re
    held = {Path(n).name for n in files} | set(files)
    bad = []
    for name, text in files.items():
        here = (ROOT / name).parent
        for ref in re.findall(r"(?<![\w.])(?:\.\./)+[\w./-]*\w", text):
            target = (here / ref).resolve()
            if ROOT.resolve() not in target.parents or not target.exists():
                bad.append((name, ref))
        if name.endswith(".md"):
            for ref in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if "://" not in ref and not (here / ref).exists():
                    bad.append((name, ref))
        for ref in re.findall(r"[\w./-]*\b[\w-]+\.md\b", text):
            if Path(ref).name not in held and Path(ref).name not in WRITTEN_BY_RUNS:
                bad.append((name, ref))
    return bad


def test_no_tracked_file_cites_a_file_outside_the_repository():
    assert cited_outside(_tracked_text_files()) == []
    # the check itself: a spec that lives beside the repository, a link to nowhere, a path out of it
    planted = {"README.md": "The method: `../specs/SPEC.md`; see [the notes](docs/NOTES.md).",
               "pilot.py": "# as SPEC.md says", "docs/METHOD.md": "x"}
    assert cited_outside(planted) == [("README.md", "../specs/SPEC.md"), ("README.md", "docs/NOTES.md"),
                                      ("README.md", "../specs/SPEC.md"), ("README.md", "docs/NOTES.md"),
                                      ("pilot.py", "SPEC.md")]
