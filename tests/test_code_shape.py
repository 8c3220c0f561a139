"""The code keeps the shape docs/architecture.md promises: short files, short functions, and no
import circle among leworld's modules (tests/code_shape.py measures them and prints the table)."""

import ast

from code_shape import MAX_FILE_LINES, MAX_FUNCTION_LINES, PAGE, import_circles, imports, measure, page_with, table


def test_files_and_functions_are_short_and_no_module_imports_its_importer():
    rows, circles = measure()
    assert {r["path"] for r in rows} >= {"leworld/train.py", "envs/base.py", "planners/cem.py"}
    assert [r["path"] for r in rows if r["lines"] > MAX_FILE_LINES] == []
    assert [(r["path"], r["function"]) for r in rows if r["function_lines"] > MAX_FUNCTION_LINES] == []
    assert circles == []
    assert PAGE.read_text() == page_with(table(rows, circles)), "docs/architecture.md's table is stale: python tests/code_shape.py --write"


def test_the_measure_finds_a_circle_and_an_import_inside_a_function():
    modules = {"leworld.a", "leworld.b", "leworld.c"}
    tree = ast.parse("import os\nfrom leworld.b import thing\ndef f():\n    import leworld.c\n")
    assert imports(tree, modules) == {"leworld.b", "leworld.c"}
    assert import_circles({"leworld.a": {"leworld.b"}, "leworld.b": {"leworld.a"}, "leworld.c": set()}) == [
        ["leworld.a", "leworld.b"]]
