"""The documentation site: executed snippets, a strict build, typeset maths in a real browser."""

import html as html_module
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from .tolerances import SUMMATION

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav():
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert nav == {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}


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


IMAGE = re.compile(r"^!\[[^\]]*\]\((figures/[^)]+)\)\n\n(.*)$", re.MULTILINE)


def test_every_figure_on_a_page_is_drawn_by_the_library_and_has_a_caption_under_it():
    from longnet_ref.figures import EXPERIMENT_FIGURES, FIGURES

    shown = {page.name: IMAGE.findall(page.read_text()) for page in PAGES}
    images = sum((re.findall(r"^!\[", page.read_text(), re.MULTILINE) for page in PAGES), [])
    assert len(images) == sum(map(len, shown.values())) >= 7, "an image without a blank line and a caption"
    for page, figures in shown.items():
        for path, caption in figures:
            name = path.removeprefix("figures/")
            assert name in FIGURES or name in EXPERIMENT_FIGURES, f"{page}: {path} is drawn by no command of the repo"
            assert caption.startswith("*Figure"), f"{page}: no caption under {path}"
    committed = {p.name for p in (DOCS / "figures").iterdir()}
    assert committed == set(FIGURES) | set(EXPERIMENT_FIGURES), "docs/figures holds exactly the generated figures"


def test_the_model_figures_redraw_from_the_committed_training_logs(tmp_path):
    """``EXPERIMENT_FIGURES``' passkey and text commands redraw from ``benchmarks/results`` alone."""
    for experiment in ("passkey", "text"):
        result = subprocess.run(
            [sys.executable, "benchmarks/model_figures.py", experiment, "--plot-only", "--runs", "benchmarks/results/model-runs", "--figures", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"model_passkey.png", "model_text_loss.png"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
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


def test_the_build_shows_what_the_worked_example_prints(site):
    """docs/hooks.py runs a ``show_output`` page and puts each block's output under it."""
    html = (site / "worked_example" / "index.html").read_text()
    assert "branch 2 (w=16, r=4) head 1 offset 1: K(p) = [1, 5, 9, 13]" in html
    assert "head 1: m(5, k) for k = 0..15: [0 2 0 1 1 3 1 2 0 1 0 0 0 1 0 0]" in html


def test_the_site_does_not_publish_the_build_hook_but_does_publish_the_tests(site):
    assert not (site / "hooks.py").exists()
    assert (site / "tests" / "test_docs.py").read_text() == Path(__file__).read_text()


def test_the_missing_figure_check_fails_the_build(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "figures" / "pattern.png").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode != 0 and "missing figures" in result.stdout + result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--window-size=1280,2400",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("page", ["index.html", "mixture/index.html"])
def test_maths_is_typeset_in_headless_chromium(site, page, tmp_path):
    """Render the built page in Chromium, read the DOM after scripts ran, keep a screenshot."""
    url = (site / page).as_uri()
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
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
        capture_output=True,
        timeout=180,
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


def _page_namespace(name):
    """The namespace left by running every ```python block of ``docs/<name>`` in order."""
    namespace = {"__name__": f"docs_{Path(name).stem}"}
    for number, block in enumerate(FENCE.findall((DOCS / name).read_text()), 1):
        exec(compile(block, f"{name}[python block {number}]", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def loops():
    return _page_namespace("scratch.md")


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 20),
    heads=st.integers(1, 4),
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 5)), min_size=1, max_size=3),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_plain_loops_agree_with_the_library(loops, n, heads, branches, causal, seed):
    """docs/scratch.md's loops are the definition; the library must compute the same numbers."""
    from longnet_ref import dilated_attention, dilated_attention_backward

    w, r = [b[0] for b in branches], [b[1] for b in branches]
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((1, n, heads, 3)) for _ in range(2))
    v, dout = (rng.standard_normal((1, n, heads, 2)) for _ in range(2))  # Dv = 2 differs from D = 3
    out, lse = loops["dilated_attention_loops"](q[0], k[0], v[0], w, r, causal)
    expected, expected_lse = dilated_attention(q, k, v, w, r, causal=causal, return_lse=True)
    # float64 in both; they differ only in the order of the sums (tests/tolerances.py SUMMATION).
    np.testing.assert_allclose(out, expected[0], **SUMMATION[np.dtype(np.float64)])
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(expected_lse[0]))
    np.testing.assert_allclose(lse, expected_lse[0], **SUMMATION[np.dtype(np.float64)])
    grads = loops["dilated_attention_backward_loops"](dout[0], q[0], k[0], v[0], out, lse, w, r, causal)
    for mine, theirs in zip(grads, dilated_attention_backward(dout, q, k, v, expected, expected_lse, w, r, causal=causal)):
        np.testing.assert_allclose(mine, theirs[0], **SUMMATION[np.dtype(np.float64)])


def test_the_plain_loop_backward_is_the_derivative_of_the_plain_loop_forward(loops):
    """Central differences of the loops' own forward: no library code on either side."""
    forward, backward = loops["dilated_attention_loops"], loops["dilated_attention_backward_loops"]
    rng = np.random.default_rng(7)
    w, r = [3, 6, 12], [1, 2, 5]  # overlapping, ragged (12 % 5), N not a multiple of any w
    q, k, v, dout = (rng.standard_normal((13, 2, 3)) for _ in range(4))
    out, lse = forward(q, k, v, w, r, causal=True)
    grads = backward(dout, q, k, v, out, lse, w, r, causal=True)
    eps = 1e-6  # float64: truncation O(eps^2) ~ 1e-12, rounding O(1e-16 / eps) ~ 1e-10
    for tensor, grad in zip((q, k, v), grads):
        for index in np.ndindex(tensor.shape):
            saved = tensor[index]
            tensor[index] = saved + eps
            plus = float((forward(q, k, v, w, r, causal=True)[0] * dout).sum())
            tensor[index] = saved - eps
            minus = float((forward(q, k, v, w, r, causal=True)[0] * dout).sum())
            tensor[index] = saved
            assert abs((plus - minus) / (2 * eps) - grad[index]) < 1e-7, index


def learn_pages():
    """The Learn part of the nav, in order: ``["overview", ...]``."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    (section,) = [entry["Learn"] for entry in nav if isinstance(entry, dict) and "Learn" in entry]
    return [Path(next(iter(page.values()))).stem for page in section]


# Run inside each page (in an iframe of the measured width) once MathJax has typeset it and its
# figures have loaded; it posts its measurements to the frame page, which writes them into its
# own DOM, where --dump-dom reads them.
MEASURE_PAGE = """<script>
window.addEventListener("load", async () => {
  await MathJax.startup.promise;
  const images = [...document.querySelectorAll(".md-content img")];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const size = el => { const box = el.getBoundingClientRect(); return [Math.round(box.width), Math.round(box.height)]; };
  const scrolls = el => { for (let e = el.parentElement; e; e = e.parentElement) {
    if (["auto", "scroll", "hidden"].includes(getComputedStyle(e).overflowX) && e !== document.documentElement
        && e !== document.body) return true; } return false; };
  const wide = [...document.querySelectorAll(".md-content *")].filter(
    el => el.getBoundingClientRect().right > window.innerWidth + 1 && !scrolls(el));
  parent.postMessage({
    page: location.pathname.split("/").slice(-2, -1)[0],
    innerWidth: window.innerWidth,
    documentWidth: document.documentElement.scrollWidth,
    overflowing: wide.slice(0, 5).map(el => el.tagName + "." + el.className + ": " + el.textContent.slice(0, 40)),
    maths: [...document.querySelectorAll("div.arithmatex mjx-container > svg")].map(size),
    untypeset: document.querySelectorAll("div.arithmatex:not(:has(mjx-container))").length,
    figures: images.map(img => [...size(img), img.naturalWidth]),
    wrappedOutput: [...document.querySelectorAll(".output pre > code")].filter(c => c.scrollWidth > c.clientWidth).length,
    wideCode: [...document.querySelectorAll(".md-typeset pre > code")].filter(c => c.scrollWidth > c.clientWidth)
      .map(c => c.textContent.split("\\n")[0].slice(0, 60)),
  }, "*");
});
</script></body>"""

FRAMES = """<!doctype html><html><body><script>
const results = {};
window.addEventListener("message", event => {
  results[event.data.page] = event.data;
  document.body.setAttribute("data-results", JSON.stringify(results));
});
</script>%s</body></html>"""


@pytest.fixture(scope="module")
def learn_measurements(site, tmp_path_factory):
    """``{width: {page: measurements}}`` for every Learn page at 390 px and 1280 px.

    Headless Chromium never lays a window out narrower than 500 px (``--window-size=390`` gives
    ``innerWidth == 500``), so each page is loaded in an iframe of exactly the width measured:
    the page's own ``window.innerWidth`` is then that width, which the tests assert. One Chromium
    run per width measures all the pages at once; on a loaded machine Chromium may dump the DOM
    before every frame has reported, so the pages that did not report are loaded again (at most
    twice more). A page that never reports still fails the test.
    """
    pages, measured = learn_pages(), {}
    for page in pages:
        html = (site / page / "index.html").read_text()
        (site / page / "measure.html").write_text(html.replace("</body>", MEASURE_PAGE, 1))
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith(("--window-size", "--virtual-time-budget"))]
    for width in (390, 1280):
        measured[width] = {}
        for attempt in range(3):
            missing = [page for page in pages if page not in measured[width]]
            if not missing:
                break
            frames = "".join(f'<iframe src="{page}/measure.html" width="{width}" height="1500"></iframe>' for page in missing)
            frame_page = site / f"frames-{width}-{attempt}.html"
            frame_page.write_text(FRAMES % frames)
            dom = subprocess.run(
                [
                    CHROMIUM,
                    *flags,
                    "--virtual-time-budget=60000",
                    f"--window-size={width + 100},1600",
                    f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
                    "--dump-dom",
                    frame_page.as_uri(),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            ).stdout
            found = re.search(r"data-results=\"([^\"]*)\"", dom)
            measured[width] |= json.loads(html_module.unescape(found.group(1))) if found else {}
    return measured


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("width", [390, 1280], ids=["phone", "desktop"])
def test_every_learn_page_fits_the_screen_at_phone_and_desktop_width(learn_measurements, width):
    """At a real 390 px viewport (and at 1280 px), on every page of the Learn path: the document
    is no wider than the viewport (only boxes that scroll may overflow: code, tables, wide
    equations), every display equation and every figure has a visible size, and what a block
    prints wraps instead of scrolling."""
    results = learn_measurements[width]
    assert sorted(results) == sorted(learn_pages()), "some pages did not report: Chromium or MathJax failed"
    problems = []
    for page, found in results.items():
        if found["innerWidth"] != width:  # a real viewport of that width
            problems.append((page, "viewport", found["innerWidth"]))
        if found["documentWidth"] > width:
            problems.append((page, "wider than the screen", found["documentWidth"], found["overflowing"]))
        if found["untypeset"]:
            problems.append((page, "untypeset display maths", found["untypeset"]))
        # 16 px: one line of body text; 60 px: a few symbols (Material's phone CSS once collapsed
        # MathJax's SVG to 8-33 px).
        if not all(h >= 16 and w >= 60 for w, h in found["maths"]):
            problems.append((page, "collapsed equations", found["maths"]))
        # a figure at least half the column wide (the column is about 350 px at 390), and loaded
        if not all(w >= min(300, width // 2) and h >= 100 and natural > 0 for w, h, natural in found["figures"]):
            problems.append((page, "figure sizes", found["figures"]))
        if found["wrappedOutput"]:
            problems.append((page, "printed output that scrolls sideways", found["wrappedOutput"]))
        # code blocks are scroll boxes (allowed to scroll); the 1280 px "no code scrolls" calibration
        # check was removed: under load it reported different pages run to run
    assert not problems, problems


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_learn_pages_show_their_maths_and_figures(learn_measurements):
    """The measurements are not vacuous: the path holds many equations and figures."""
    phone = learn_measurements[390]
    assert sum(len(found["maths"]) for found in phone.values()) >= 25
    assert sum(len(found["figures"]) for found in phone.values()) >= 8


# The code column at 1280 px holds 111 characters of Material's code font (measured in Chromium:
# 938 px of content at 8.18 px a character, less the padding); 106 leaves a margin.
CODE_LINE_LIMIT = 106


def test_code_lines_fit_the_column_at_desktop_width():
    long = [
        f"{page.name}: {line[:60]}..."
        for page in PAGES
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", page.read_text(), re.DOTALL | re.MULTILINE)
        for line in block.splitlines()
        if len(line) > CODE_LINE_LIMIT
    ]
    assert not long, long


def test_every_test_a_page_names_exists_and_the_built_page_links_its_file(site):
    """docs/hooks.py turns `test_name` into a link to the file that defines it."""
    defined = {
        name: path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)
    }
    named = {(page.stem, name) for page in PAGES for name in re.findall(r"`(test_\w+)`", page.read_text())}
    assert len(named) >= 20
    missing = sorted(f"{page}.md: {name}" for page, name in named if name not in defined)
    assert not missing, f"pages name tests that do not exist: {missing}"
    for page, name in named:
        html = (site / ("" if page == "index" else page) / "index.html").read_text()
        assert f'href="../{defined[name]}"' in html or f'href="{defined[name]}"' in html, (page, name)


def test_headings_hold_no_maths_because_the_table_of_contents_shows_it_raw():
    headings = [f"{page.name}: {line}" for page in PAGES for line in page.read_text().splitlines() if line.startswith("#") and ("\\(" in line or "$" in line)]
    assert not headings, headings


def _hooks():
    """docs/hooks.py, the build's own conversion of a page into a notebook and a script."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_learn_page_runs_as_a_notebook_top_to_bottom(tmp_path):
    """The notebook and script of every Learn page (jupytext, as the build publishes them) hold
    every ```python block of the page as a code cell, in order, and the script runs top to bottom
    in a fresh interpreter, one page after another, each in its own namespace."""
    import nbformat

    hooks, scripts = _hooks(), []
    for page in learn_pages():
        markdown = (DOCS / f"{page}.md").read_text()
        files = hooks.notebook_files(markdown)
        book = nbformat.reads(files[".ipynb"], as_version=4)
        nbformat.validate(book)
        code = [cell.source.strip() for cell in book.cells if cell.cell_type == "code"]
        assert code == [block.strip() for block in FENCE.findall(markdown)], page
        if code:
            scripts.append(tmp_path / f"{page}.py")
            scripts[-1].write_text(files[".py"])
    assert len(scripts) >= 10
    run_all = "import runpy, sys\nfor path in sys.argv[1:]:\n    print(path, flush=True)\n    runpy.run_path(path)\n"
    result = subprocess.run(
        [sys.executable, "-c", run_all, *map(str, scripts)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, MPLBACKEND="Agg"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_the_site_publishes_every_learn_page_as_a_notebook_and_links_it(site):
    for page in learn_pages():
        if not FENCE.search((DOCS / f"{page}.md").read_text()):
            continue
        for suffix in (".ipynb", ".py"):
            assert (site / "notebooks" / f"{page}{suffix}").is_file(), (page, suffix)
        html = (site / page / "index.html").read_text()
        assert f'href="../notebooks/{page}.ipynb"' in html and f'href="../notebooks/{page}.py"' in html, page


def test_spec_citations_link_to_their_section_in_pages_and_in_docstrings(site):
    """``SPEC §N`` in prose (docs/hooks.py, Markdown) and in the API's docstrings (HTML) is a
    link to an anchor that exists on the spec page."""
    spec = (site / "spec" / "index.html").read_text()
    links = {}
    for page, prefix in (("segments", "../"), ("api/nn", "../../")):
        links[page] = re.findall(rf'SPEC <a href="{prefix}spec/(?:index.html)?#([\w-]+)">§(\d)</a>', (site / page / "index.html").read_text())
        assert links[page], page
        for anchor, number in links[page]:
            assert anchor.startswith(f"{number}-") and f'id="{anchor}"' in spec, (page, anchor)
