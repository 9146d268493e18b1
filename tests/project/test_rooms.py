"""cmdcl_cache's rooms hold: who may import whom, how big a room and a module may grow, one owner per name.

The rooms, bottom up: the small pieces at the top of the package (errors, files, config, progress, device),
manifest/, cache/, then extract/ and ingest/ side by side, and cli.py over all of them.
"""

import ast
import functools
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "cmdcl_cache"
ROOMS = ("manifest", "cache", "extract", "ingest")
# A room may import these rooms (and the small pieces at the top); never the others.
MAY_IMPORT = {"manifest": set(), "cache": {"manifest"}, "extract": {"manifest", "cache"},
              "ingest": {"manifest", "cache"}}
MAX_LINES, MAX_MODULES = 560, 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules(root: Path = PACKAGE) -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROOMS else None


def imported(tree: ast.Module, everywhere: bool = True) -> set[str]:
    """cmdcl_cache modules a module imports: anywhere in it, or (everywhere=False) when it is imported,
    which leaves out imports inside functions and under `if TYPE_CHECKING:`."""
    nodes = ast.walk(tree) if everywhere else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cmdcl_cache"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}   # `from cmdcl_cache.cache import folder`
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cmdcl_cache")}
    return found


def test_every_import_inside_cmdcl_cache_is_absolute():
    relative = [f"{m}: line {n.lineno}" for m, tree in modules().items() for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, relative


def test_a_room_imports_only_the_rooms_below_it():
    wrong = []
    for module, tree in modules().items():
        room = room_of(module)
        if room is None:
            continue
        for target in imported(tree):
            other = room_of(target)
            if other is not None and other != room and other not in MAY_IMPORT[room]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_the_small_pieces_at_the_bottom_import_no_room():
    bottom = ("errors", "files", "config", "progress", "device")
    wrong = [f"cmdcl_cache.{name} imports {target}" for name in bottom
             for target in imported(modules()[f"cmdcl_cache.{name}"]) if room_of(target)]
    assert not wrong, wrong


def test_no_module_imports_itself_back_through_others():
    graph = {m: {t for t in imported(tree, everywhere=False) if t in modules()} - {m}
             for m, tree in modules().items()}
    # a package's __init__ is imported with its modules: an edge to a package is an edge to its __init__
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_modules_and_rooms_stay_small():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    crowded = {str(d.relative_to(REPO)): n for d in [PACKAGE, *PACKAGE.rglob("*")] if d.is_dir()
               if (n := len(list(d.glob("*.py")))) > MAX_MODULES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    assert not crowded, f"folders with more than {MAX_MODULES} modules: {crowded}"


def test_cmdcl_heads_reaches_cmdcl_cache_through_few_doors():
    doors = set()
    for tree in modules(REPO / "cmdcl_heads").values():
        doors |= {t for t in imported(tree) if t in modules()}
    assert len(doors) <= 4, sorted(doors)


def _definitions():
    """(module, name) of every top-level function, class and constant of cmdcl_cache."""
    for module, tree in modules().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                yield module, node.name
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            yield module, name.id


def test_every_name_has_one_owner():
    # the builders (and the demo) share one protocol: each module is one dataset's `build`, SOURCE, LICENCE...
    protocol = {"build", "SOURCE", "LICENCE", "SPLIT_SCHEME", "EXCLUDED_BY_VIS4MER_MALMM", "__all__", "__version__"}
    owners = Counter(name for _, name in _definitions() if name not in protocol and not name.startswith("_"))
    twice = {name: sorted(m for m, n in _definitions() if n == name) for name, count in owners.items() if count > 1}
    assert not twice, twice
    for name in ("provenance_difference", "normalised", "check_video_id"):
        assert owners[name] == 1, name


def test_each_file_name_of_a_cache_folder_is_written_once():
    literals = Counter()
    for tree in modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"[\w.-]+\.(jsonl|h5|lock)", node.value):
                literals[node.value] += 1
    assert literals["failures.jsonl"] == 1 and literals["extract_log.jsonl"] == 1, literals
    assert all(count == 1 for count in literals.values()), literals


def test_no_function_imports_what_its_module_already_imports():
    repeats = []
    for module, tree in {**modules(), **modules(REPO / "cmdcl_heads")}.items():
        top = {(n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        top |= {(a.name, None) for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                names = ({(n.module, a.name) for a in n.names} if isinstance(n, ast.ImportFrom) else
                         {(a.name, None) for a in n.names} if isinstance(n, ast.Import) else set())
                repeats += [f"{module}.{fn.name}: {name}" for name in names & top]
    assert not repeats, repeats


def test_the_cache_cli_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "cmdcl_cache.cli", "--help"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "cmdcl_cache.config" in loaded and "extract" in out.stdout
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "open_clip")}


def test_the_development_map_names_every_module_and_nothing_else():
    """docs/development.md draws both packages as trees, two spaces a level: they must be the folders' own."""
    text = (REPO / "docs" / "development.md").read_text()
    block = text[text.index("```\ncmdcl_cache/") + 4:]
    block = block[:block.index("```")]
    named, stack = set(), []
    for line in block.splitlines():
        level, word = (len(line) - len(line.lstrip())) // 2, line.split()[0]
        if level == 0 and word not in ("cmdcl_cache/", "cmdcl_heads/"):
            stack = []
            continue
        if not stack and level:
            continue   # a continuation line of a top-level entry
        stack = stack[:level] + [word]
        if word.endswith(".py"):
            named.add("".join(stack))
    on_disk = {str(p.relative_to(REPO)) for package in ("cmdcl_cache", "cmdcl_heads")
               for p in (REPO / package).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    missing, stale = sorted(on_disk - named), sorted(named - on_disk)
    assert not missing and not stale, f"missing from the map: {missing}; not on disk: {stale}"
