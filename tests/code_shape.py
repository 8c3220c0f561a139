"""The shape of the code: lines per file, the longest function of each, and the import circles among
leworld's modules. `python tests/code_shape.py` prints the table, `--write` puts it at the end of
docs/architecture.md; tests/test_code_shape.py holds the code to its limits and the page to the code.

A function's length counts every line from its `def` (decorators included) to its last line. An
import is any `import` or `from ... import` of a leworld module, at the top of a file or inside a
function; `from leworld.x import y` depends on leworld.x.y when that is a module, else on leworld.x.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE, HEADING = ROOT / "docs" / "architecture.md", "## The shape of the code"
FOLDERS = ("leworld", "envs", "planners")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def functions(tree: ast.AST) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                found.append((prefix + child.name, child.end_lineno - first + 1))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The leworld modules a file imports (see the module's docstring)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module, and modules that import themselves (Tarjan)."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return circles


def measure() -> tuple[list[dict], list[list[str]]]:
    """-> a row per file (path, lines, longest function, its lines) and the import circles."""
    files = source_files()
    trees = {path: ast.parse(path.read_text(), str(path)) for path in files}
    modules = {module_name(path) for path in files}
    rows, graph = [], {}
    for path, tree in trees.items():
        longest = max(functions(tree), key=lambda f: f[1], default=("-", 0))
        rows.append({"path": str(path.relative_to(ROOT)), "lines": len(path.read_text().splitlines()),
                     "function": longest[0], "function_lines": longest[1]})
        graph[module_name(path)] = imports(tree, modules) - {module_name(path)}
    return rows, import_circles(graph)


def table(rows: list[dict], circles: list[list[str]]) -> str:
    lines = [f"| file | lines (at most {MAX_FILE_LINES}) | longest function | its lines (at most {MAX_FUNCTION_LINES}) |",
             "|---|---:|---|---:|"]
    lines += [f"| {r['path']} | {r['lines']} | `{r['function']}` | {r['function_lines']} |" for r in rows]
    lines.append("")
    lines.append("Import circles among leworld's modules: " + ("; ".join(" -> ".join(c) for c in circles) or "none") + ".")
    return "\n".join(lines)


def page_with(shape: str) -> str:
    """docs/architecture.md with `shape` as its last section's table (after the section's first paragraph)."""
    text = PAGE.read_text()
    section = text.index(HEADING)
    intro_end = text.index("\n\n", text.index("\n\n", section) + 2) + 2
    return text[:intro_end] + shape + "\n"


if __name__ == "__main__":
    rows, circles = measure()
    shape = table(rows, circles)
    if sys.argv[1:] == ["--write"]:
        PAGE.write_text(page_with(shape))
    else:
        print(shape)
    too_long = [r for r in rows if r["lines"] > MAX_FILE_LINES or r["function_lines"] > MAX_FUNCTION_LINES]
    sys.exit(1 if too_long or circles else 0)
