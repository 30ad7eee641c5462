"""The house rules that keep the code readable (docs/design.md, "The house"), checked on every run."""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = sorted((REPO / "advjax").glob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_no_library_module_is_over_400_lines_and_no_function_over_60(path):
    source = path.read_text()
    assert source.count("\n") <= 400, f"{path.name}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}:{node.lineno} {node.name} is {length} lines"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_the_library_reads_config_fields_without_get_fallbacks(path):
    # A default lives in configs/default.py alone: config.x.get("field", default) would write it twice.
    fallbacks = re.findall(r"\b(?:config|section|\w+_config)(?:\.\w+)*\.get\(", path.read_text())
    assert not fallbacks, f"{path.name}: {fallbacks}"


def test_the_readme_is_a_page_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") <= 200
    for target in re.findall(r"\]\(([^)#\s]+)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


@pytest.mark.parametrize("doc", ["design.md", "results.md"])
def test_every_section_the_code_cites_is_in_the_docs(doc):
    headings = set(re.findall(r"^#+ (.+)$", (REPO / "docs" / doc).read_text(), re.M))
    code = " ".join(p.read_text() for p in [*LIBRARY, *(REPO / "configs").glob("*.py")])
    cited = set(re.findall(rf'docs/{re.escape(doc)},\s+"([^"]+)"', " ".join(code.split())))
    assert cited, "no citations found: the pattern is wrong"
    assert cited <= headings, cited - headings
