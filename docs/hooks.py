"""MkDocs hooks of the longnet_ref site (``hooks:`` in ``mkdocs.yml``; excluded from the site).

- The build fails if a generated figure is missing (``longnet-ref pattern`` draws them).
- The test files are published beside the pages (``tests/*.py``), so a page names a test with a
  link a reader can follow and the strict build checks that the file exists.
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

from longnet_ref.figures import FIGURES

FENCE = re.compile(r"^```python\n(.*?)^```\n", re.DOTALL | re.MULTILINE)


def on_pre_build(config, **kwargs):
    figures = Path(config["docs_dir"]) / "figures"
    missing = [name for name in FIGURES if not (figures / name).is_file()]
    if missing:
        raise PluginError(f"missing figures {missing} in {figures}: run `longnet-ref pattern --output-dir {figures}`")


def on_files(files, config, **kwargs):
    tests = Path(config["docs_dir"]).resolve().parent / "tests"
    for path in sorted(tests.glob("test_*.py")):
        files.append(File.generated(config, f"tests/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if not page.meta.get("show_output"):
        return markdown
    namespace = {"__name__": f"docs_{Path(page.file.src_uri).stem}"}

    def run_and_show(match):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(match.group(1), page.file.src_uri, "exec"), namespace)  # noqa: S102 (our own pages)
        shown = printed.getvalue()
        return match.group(0) + (f"\n```text\n{shown}```\n" if shown else "")

    return FENCE.sub(run_and_show, markdown)
