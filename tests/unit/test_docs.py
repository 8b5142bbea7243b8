"""The reference pages under docs/ are what their single sources render now, and the README links them."""

from pathlib import Path

import pytest

from lorabench import docs
from lorabench.results.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(docs.PAGES))
def test_a_generated_page_is_what_its_source_renders(name):
    assert (ROOT / "docs" / name).read_text() == docs.PAGES[name]() + "\n", (
        f"docs/{name} is stale: run `python -m lorabench.docs`"
    )


def test_the_pages_hold_every_metric_and_every_flag():
    from lorabench.parser import build_parser

    metrics, cli = docs.metrics_page(), docs.cli_page()
    assert all(f"`{m.key}`" in metrics for m in METRICS)
    run = next(a for a in build_parser()._actions if a.dest == "command").choices["run"]
    flags = [s for a in run._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) > 40 and all(f in cli for f in flags)


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 16_000  # what it answers, the two commands, one example, where to go next
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name


REFERENCE_RUN = (
    "20261123-211355-558bee"  # the reference report (test_reports holds it to the code); others sit beside it
)


def test_the_readme_example_is_the_committed_report_which_the_current_code_renders():
    """The example's lines are what the current code prints at the end of the reference run (the
    terminal's answers) and cut from the reference report, whose own drift test (test_reports)
    holds it to what the current code renders."""
    from lorabench.render.report import summary
    from lorabench.results.rundir import RunDir

    readme = (ROOT / "README.md").read_text()
    report = (ROOT / "report" / f"{REFERENCE_RUN}.md").read_text()
    terminal = summary(RunDir.load([ROOT / "results" / REFERENCE_RUN])[0])
    example = readme[readme.index("## Example output") : readme.index("## Where to go next")]
    shown = example[example.index("```text") + len("```text") : example.index("```\n\n")].strip()
    assert shown and shown in terminal
    table = [line for line in example.splitlines() if line.startswith("|") and line not in shown]
    assert len(table) > 10 and all(line in report for line in table)


TOPS = ("lorabench/", "tests/", "bench/", "docs/", ".github/", ".ci/", "results/", "report/", "examples/")


def references(md: Path) -> list[tuple[str, Path]]:
    """(what the page names, where it must be) of every link and every path or module a page names
    in backticks (placeholders such as <run-id> left out)."""
    import re

    text, out = md.read_text(), []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1).split("#")[0]
        if target and not target.startswith(("http://", "https://", "mailto:")):
            out.append((target, md.parent / target))
    for m in re.finditer(r"`([^`\s]+)`", text):
        name = m.group(1).rstrip(".,:;")
        if name.startswith(TOPS) and not any(c in name for c in "<>*{}$"):
            out.append((name, ROOT / name.split(":")[0]))
        elif re.fullmatch(r"lorabench(\.[a-z_]+)+", name):  # a module, or an attribute of one
            parts = name.split(".")
            found = [
                p
                for i in range(len(parts), 1, -1)
                for p in (
                    ROOT.joinpath(*parts[:i]).with_suffix(".py"),
                    ROOT.joinpath(*parts[:i], "__init__.py"),
                )
                if p.exists()
            ]
            out.append((name, found[0] if found else ROOT.joinpath(*parts)))
    return out


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
)
def test_every_reference_in_the_docs_resolves_inside_the_repository(page):
    """A link or a named file must be in the repository a user clones: nothing outside it (the
    README once linked ../shared/), nothing moved or removed since the page was written."""
    md = ROOT / page
    missing = [name for name, where in references(md) if not where.exists()]
    assert not missing, f"{page} names what the repository does not hold: {missing}"
    for name, where in references(md):
        assert ROOT in where.resolve().parents or where.resolve() == ROOT, (
            f"{page}: {name} lies outside the repository"
        )


def test_the_layout_page_names_every_module_in_its_phase():
    """docs/layout.md's table lists each phase's modules: a module added, moved or removed shows
    here until the page says so (it once left out nine, results/history.py among them)."""
    rows = {}
    for line in (ROOT / "docs" / "layout.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            phase = cells[0].strip("`/")
            rows.setdefault(phase, set()).update(c.strip("` ") for c in cells[1].split(","))
    package = ROOT / "lorabench"
    on_disk = {"(root)": {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}}
    for folder in package.iterdir():
        if folder.is_dir() and (folder / "__init__.py").exists():
            on_disk[folder.name] = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert rows == on_disk
