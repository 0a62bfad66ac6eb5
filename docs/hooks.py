"""MkDocs hooks of the longnet_ref site (``hooks:`` in ``mkdocs.yml``; excluded from the site).

- The build fails if a generated figure is missing (``longnet-ref pattern`` draws them).
- The test files are published beside the pages (``tests/**/test_*.py``), and every test a page
  names in backticks, `` `test_...` ``, becomes a link to the file that defines it: a reader can
  follow it, and the strict build fails if the file does not exist (``tests/test_docs.py``
  checks that every named test exists).
- Every page of the Learn part of the nav (and any page whose front matter says
  ``show_output: true``) is executed at build time, block after block in one namespace, and
  whatever a ```python block prints is shown under it: the numbers on such a page are computed
  by the library when the site is built and cannot go stale. (``tests/test_docs.py`` runs the
  same blocks, so their ``assert`` lines are tests.)
- Every Learn page is also published as a notebook and as a script (``notebooks/<page>.ipynb``,
  ``notebooks/<page>.py``), converted from the page by jupytext, and a line under its title links
  both (``tests/test_docs.py`` runs every generated script top to bottom).
- ``SPEC §N`` in prose becomes a link to section N of the specification page (in the Markdown
  of a page, and in the HTML of the docstrings the API pages render).
- Short inline code with a hyphen (``--eval-every``, ``-inf``) is marked ``nowrap``: a browser
  breaks a line after any hyphen, and an option split as "--" / "eval-every" misreads.
"""

import contextlib
import io
import re
from pathlib import Path

import jupytext

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

from longnet_ref.figures import EXPERIMENT_FIGURES, FIGURES

FENCE = re.compile(r"^```python\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
LEARN = "Learn"  # the title of the nav section whose pages are the course


def learn_pages(config):
    """The source paths (``overview.md``, ...) of the Learn section of the nav, in order."""
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and LEARN in entry:
            return [
                next(iter(page.values())) if isinstance(page, dict) else page
                for page in entry[LEARN]
            ]
    return []


def for_jupyter(text):
    """Markdown of the site -> Markdown that Jupyter renders: ``\\(x\\)`` -> ``$x$`` (Jupyter's
    Markdown would eat the backslash), admonitions -> block quotes with a bold title."""
    parts = re.split(
        r"(^```.*?^```$|`[^`\n]*`)", text, flags=re.DOTALL | re.MULTILINE
    )  # not in code
    text = "".join(
        part
        if index % 2
        else re.sub(r"\\\((.+?)\\\)", lambda m: f"${m.group(1).strip()}$", part, flags=re.DOTALL)
        for index, part in enumerate(parts)
    )

    def quote(match):
        body = "\n".join(
            "> " + line[4:] if line.strip() else ">"
            for line in match.group(2).rstrip("\n").split("\n")
        )
        return f"> **{match.group(1)}**\n>\n{body}\n"

    return re.sub(
        r'^!!! \w+ "([^"]*)"\n((?:(?: {4}.*)?\n)*(?: {4}.*\n?))', quote, text, flags=re.MULTILINE
    )


def notebook(markdown):
    """The notebook of a page: its prose as Markdown cells, its ```python blocks as code cells."""
    book = jupytext.reads(re.sub(r"\A---\n.*?\n---\n", "", markdown, flags=re.DOTALL), fmt="md")
    for cell in book.cells:
        if cell.cell_type == "markdown":
            cell.source = for_jupyter(cell.source)
    book.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    return book


def notebook_files(markdown):
    """``{suffix: text}``: the page as ``.ipynb`` and as a jupytext percent ``.py`` script."""
    book = notebook(markdown)
    return {
        ".ipynb": jupytext.writes(book, fmt="ipynb"),
        ".py": jupytext.writes(book, fmt="py:percent"),
    }


def on_pre_build(config, **kwargs):
    figures = Path(config["docs_dir"]) / "figures"
    missing = [name for name in (*FIGURES, *EXPERIMENT_FIGURES) if not (figures / name).is_file()]
    if missing:
        raise PluginError(
            f"missing figures {missing} in {figures}: run `longnet-ref pattern --output-dir {figures}`"
        )


TEST_NAME = re.compile(r"(?<!\[)`(test_\w+)`(?!\]\()")


def test_files(config):
    """``{relative path: file}`` of every test module, ``tests/...``."""
    root = Path(config["docs_dir"]).resolve().parent
    return {
        path.relative_to(root).as_posix(): path
        for path in sorted((root / "tests").rglob("test_*.py"))
    }


def defining_file(config):
    """``{test name: the test file that defines it}``."""
    where = {}
    for relative, path in test_files(config).items():
        for name in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE):
            where.setdefault(name, relative)
    return where


def on_files(files, config, **kwargs):
    for relative, path in test_files(config).items():
        files.append(File.generated(config, relative, abs_src_path=str(path)))
    docs = Path(config["docs_dir"])
    for page in learn_pages(config):
        if (docs / page).is_file():
            for suffix, text in notebook_files((docs / page).read_text(encoding="utf-8")).items():
                files.append(
                    File.generated(config, f"notebooks/{Path(page).stem}{suffix}", content=text)
                )
    return files


SPEC_SECTIONS = re.compile(r"SPEC\s*((?:§\s*\d+(?:\s*[-–]\s*\d+)?(?:,\s*|\s+and\s+)?)+)")


def link_spec_citations(markdown, page, config):
    """``SPEC §2`` -> a link to ``spec.md``'s ``§2`` heading; ``SPEC §2-4`` links §2 and §4."""
    spec = Path(config["docs_dir"]) / "spec.md"
    anchors = {
        number: re.sub(r"[^\w\s-]", "", f"{number}. {title}").strip().lower().replace(" ", "-")
        for number, title in re.findall(
            r"^## §(\d+)\. (.*)$", spec.read_text(encoding="utf-8"), re.MULTILINE
        )
    }
    target = "../" * page.file.src_uri.count("/") + (
        "" if page.file.src_uri == "spec.md" else "spec.md"
    )

    def link(match):
        def one(number):
            anchor = anchors.get(number.group(1))
            return f"[§{number.group(1)}]({target}#{anchor})" if anchor else number.group(0)

        return "SPEC " + re.sub(r"§\s*(\d+)", one, match.group(1))

    # only in prose: not in code blocks, inline code or an existing link's text
    parts = re.split(
        r"(^```.*?^```$|`[^`\n]*`|\[[^\]\n]*\]\([^)\n]*\))",
        markdown,
        flags=re.DOTALL | re.MULTILINE,
    )
    return "".join(
        part if index % 2 else SPEC_SECTIONS.sub(link, part) for index, part in enumerate(parts)
    )


def link_test_names(markdown, page, config):
    where = defining_file(config)
    depth = "../" * page.file.src_uri.count("/")  # pages in sub-folders: link up to the docs root

    def link(match):
        name = match.group(1)
        return f"[`{name}`]({depth}{where[name]})" if name in where else match.group(0)

    return TEST_NAME.sub(link, markdown)


def download_links(markdown, page):
    """A line under the title: the page runs as it reads, and here it is as a notebook or script."""
    stem = Path(page.file.src_uri).stem
    line = (
        f'\n\n<p class="page-download" markdown>The code blocks of this page run in order in one Python '
        f"session, as the notebook does. Download the page: [notebook](notebooks/{stem}.ipynb) · "
        f"[script](notebooks/{stem}.py).</p>\n"
    )
    return re.sub(
        r"^(# .*)$", lambda title: title.group(1) + line, markdown, count=1, flags=re.MULTILINE
    )


def on_page_markdown(markdown, page, config, files):
    markdown = link_spec_citations(link_test_names(markdown, page, config), page, config)
    learn = page.file.src_uri in learn_pages(config)
    if learn and FENCE.search(markdown):
        markdown = download_links(markdown, page)
    if not (learn or page.meta.get("show_output")):
        return markdown
    namespace = {"__name__": f"docs_{Path(page.file.src_uri).stem}"}

    def run_and_show(match):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(match.group(1), page.file.src_uri, "exec"), namespace)  # noqa: S102 (our own pages)
        shown = printed.getvalue()
        return match.group(0) + (
            f"\n```{{ .text .output .no-copy title=\"printed by the block above\" }}\n{shown}```\n"
            if shown
            else ""
        )

    return FENCE.sub(run_and_show, markdown)


def on_page_content(html, page, config, files):
    """``SPEC §N`` left unlinked by the Markdown pass (in docstrings the API pages render) -> a link."""
    spec = Path(config["docs_dir"]) / "spec.md"
    anchors = {
        number: re.sub(r"[^\w\s-]", "", f"{number}. {title}").strip().lower().replace(" ", "-")
        for number, title in re.findall(
            r"^## §(\d+)\. (.*)$", spec.read_text(encoding="utf-8"), re.MULTILINE
        )
    }
    target = "../" * page.url.count("/") + "spec/"
    parts, inside = re.split(r"(<[^>]+>)", html), []

    def link(match):
        def one(number):
            anchor = anchors.get(number.group(1))
            return (
                f'<a href="{target}#{anchor}">§{number.group(1)}</a>' if anchor else number.group(0)
            )

        return "SPEC " + re.sub(r"§\s*(\d+)", one, match.group(1))

    for index, part in enumerate(parts):
        tag = re.match(r"<(/?)(a|code|pre|script|h\d)\b", part)
        if tag:
            if tag.group(1):
                if tag.group(2) in inside:
                    inside.remove(tag.group(2))
            else:
                inside.append(tag.group(2))
        elif not part.startswith("<") and not inside:
            parts[index] = SPEC_SECTIONS.sub(link, part)
    return SHORT_HYPHENATED_CODE.sub(r'<code class="nowrap">\1</code>', "".join(parts))


# inline code of at most 24 characters (it fits a phone's line) holding a hyphen
SHORT_HYPHENATED_CODE = re.compile(r"<code>(?=[^<]{1,24}</code>)([^<]*-[^<]*)</code>")
