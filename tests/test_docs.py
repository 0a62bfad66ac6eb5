"""The documentation site: executed snippets, a strict build, typeset maths in a real browser."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav():
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert nav == {p.name for p in PAGES}


@pytest.mark.parametrize("page", [p for p in PAGES if FENCE.search(p.read_text())], ids=lambda p: p.name)
def test_python_snippets_on_the_page_run(page):
    """Every ```python block of a page, in order, in one namespace: the docs cannot rot."""
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(FENCE.findall(page.read_text()), 1):
        exec(compile(block, f"{page.name}[python block {number}]", "exec"), namespace)


def test_figures_are_drawn_by_the_library(tmp_path):
    from longnet_ref.figures import FIGURES, generate

    written = generate(tmp_path)
    assert [p.name for p in written] == list(FIGURES)
    assert all(p.stat().st_size > 5000 for p in written)
    assert all((DOCS / "figures" / name).is_file() for name in FIGURES), "run: longnet-ref pattern"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return site_dir


def test_mkdocs_build_strict_passes_and_serves_mathjax_locally(site):
    assert (site / "index.html").is_file() and (site / "mixture" / "index.html").is_file()
    assert (site / "javascripts" / "mathjax" / "tex-svg-full.js").stat().st_size > 1_000_000
    html = (site / "mixture" / "index.html").read_text()
    assert "javascripts/mathjax/tex-svg-full.js" in html and "cdn" not in html.lower()
    assert 'class="arithmatex"' in html
    for name in ("pattern.png", "multiplicity.png"):
        assert (site / "figures" / name).is_file()


def test_the_missing_figure_check_fails_the_build(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "figures" / "pattern.png").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode != 0 and "missing figures" in result.stdout + result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1280,2400",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("page", ["index.html", "mixture/index.html"])
def test_maths_is_typeset_in_headless_chromium(site, page, tmp_path):
    """Render the built page in Chromium, read the DOM after scripts ran, keep a screenshot."""
    url = (site / page).as_uri()
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    ).stdout
    assert "<mjx-container" in dom, "MathJax did not typeset the page"
    typeset = dom.count("<mjx-container")
    raw = [m for m in re.findall(r'<span class="arithmatex">(.*?)</span>', dom, re.S) if "\\(" in m or "\\[" in m]
    assert not raw, f"untypeset maths left: {raw[:3]}"
    assert "$$" not in re.sub(r"<script.*?</script>", "", dom, flags=re.S)
    assert typeset >= (10 if page.startswith("mixture") else 3)
    artefacts = ROOT / "test-artefacts"
    artefacts.mkdir(exist_ok=True)
    shot = artefacts / (page.replace("/", "_").replace(".html", ".png"))
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
        capture_output=True, timeout=180,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000


# "SPEC §3", "SPEC §3-5", "SPEC §2, §7": every cited number must be a section of docs/spec.md.
SPEC_CITATION = re.compile(r"SPEC\s*((?:§\s*\d+(?:\s*[-–]\s*\d+)?[\s,and]*)+)")
CITING = [ROOT / "README.md", *(ROOT / d for d in ("longnet_ref", "tests", "docs", "benchmarks"))]


def _cited_spec_sections():
    files = [p for top in CITING for p in ([top] if top.is_file() else top.rglob("*")) if p.suffix in {".py", ".md"}]
    cited = {}
    for path in files:
        for match in SPEC_CITATION.finditer(path.read_text(encoding="utf-8")):
            for first, last in re.findall(r"§\s*(\d+)(?:\s*[-–]\s*(\d+))?", match.group(1)):
                for number in range(int(first), int(last or first) + 1):
                    cited.setdefault(number, path.relative_to(ROOT))
    return cited


def test_every_spec_citation_names_a_section_of_the_spec_page():
    headings = set(map(int, re.findall(r"^## §(\d+)\. ", (DOCS / "spec.md").read_text(), re.MULTILINE)))
    assert headings == set(range(1, 9)), headings  # the eight sections of the specification
    cited = _cited_spec_sections()
    assert len(cited) >= 6, cited  # the scan finds the citations (guards against a broken pattern)
    missing = {n: str(path) for n, path in cited.items() if n not in headings}
    assert not missing, f"SPEC sections cited but absent from docs/spec.md: {missing}"


def test_no_file_points_to_a_spec_file_the_repository_does_not_contain():
    for top in CITING:
        for path in [top] if top.is_file() else top.rglob("*"):
            if path.suffix in {".py", ".md"} and path.name != "test_docs.py":
                assert "SPEC.md" not in path.read_text(encoding="utf-8"), path
