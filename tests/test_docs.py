"""The docs travel with the code: generated tables match the graph, links resolve in a clone."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from aprtrace.cli import main
from aprtrace.stages import stages_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_stage_table_is_generated_from_the_graph():
    text = (ROOT / "docs" / "stages.md").read_text(encoding="utf-8")
    block = text.split("<!-- generated: aprtrace stages --markdown -->\n", 1)[1]
    block = block.split("<!-- end generated -->", 1)[0]
    assert block == stages_markdown(), "regenerate: aprtrace stages --markdown"
    assert CliRunner().invoke(main, ["stages", "--markdown"]).output == stages_markdown()


def test_readme_and_docs_link_only_to_files_of_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_exit_codes_table_matches_the_error_classes():
    from aprtrace import errors
    from aprtrace.diff import EXIT_INCOMPLETE

    text = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8").split("## Exit codes")[1]
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", text, re.M)}
    expected = {0, errors.EXIT_DIVERGED, 2, EXIT_INCOMPLETE, errors.EXIT_INTERNAL}
    expected |= {errors.EXIT_INTERRUPTED}
    expected |= {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.AprtraceError)
        and cls is not errors.AprtraceError
    }
    assert codes == expected
