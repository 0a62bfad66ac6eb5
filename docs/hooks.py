"""MkDocs hooks of the longnet_ref site (``hooks:`` in ``mkdocs.yml``; excluded from the site).

- The build fails if a generated figure is missing (``longnet-ref pattern`` draws them).
- The test files are published beside the pages (``tests/**/test_*.py``), and every test a page
  names in backticks, `` `test_...` ``, becomes a link to the file that defines it: a reader can
  follow it, and the strict build fails if the file does not exist (``tests/test_docs.py``
  checks that every named test exists).
- A page whose front matter says ``show_output: true`` is executed at build time, block after
  block in one namespace, and whatever a ```python block prints is shown under it: the numbers
  on such a page are computed by the library when the site is built and cannot go stale.
  (``tests/test_docs.py`` runs the same blocks, so their ``assert`` lines are tests.)
"""

import contextlib
import io
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

from longnet_ref.figures import EXPERIMENT_FIGURES, FIGURES

FENCE = re.compile(r"^```python\n(.*?)^```\n", re.DOTALL | re.MULTILINE)


def on_pre_build(config, **kwargs):
    figures = Path(config["docs_dir"]) / "figures"
    missing = [name for name in (*FIGURES, *EXPERIMENT_FIGURES) if not (figures / name).is_file()]
    if missing:
        raise PluginError(f"missing figures {missing} in {figures}: run `longnet-ref pattern --output-dir {figures}`")


TEST_NAME = re.compile(r"(?<!\[)`(test_\w+)`(?!\]\()")


def test_files(config):
    """``{relative path: file}`` of every test module, ``tests/...``."""
    root = Path(config["docs_dir"]).resolve().parent
    return {path.relative_to(root).as_posix(): path for path in sorted((root / "tests").rglob("test_*.py"))}


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
    return files


def link_test_names(markdown, page, config):
    where = defining_file(config)
    depth = "../" * page.file.src_uri.count("/")  # pages in sub-folders: link up to the docs root

    def link(match):
        name = match.group(1)
        return f"[`{name}`]({depth}{where[name]})" if name in where else match.group(0)

    return TEST_NAME.sub(link, markdown)


def on_page_markdown(markdown, page, config, files):
    markdown = link_test_names(markdown, page, config)
    if not page.meta.get("show_output"):
        return markdown
    namespace = {"__name__": f"docs_{Path(page.file.src_uri).stem}"}

    def run_and_show(match):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(match.group(1), page.file.src_uri, "exec"), namespace)  # noqa: S102 (our own pages)
        shown = printed.getvalue()
        return match.group(0) + (f"\n```text title=\"printed by the block above\"\n{shown}```\n" if shown else "")

    return FENCE.sub(run_and_show, markdown)
