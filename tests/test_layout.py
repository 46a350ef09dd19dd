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
