"""MkDocs hooks of the longnet_ref site (``hooks:`` in ``mkdocs.yml``; excluded from the site).

- The build fails if a generated figure is missing (``longnet-ref pattern`` draws them).
- The test files are published beside the pages (``tests/*.py``), so a page names a test with a
  link a reader can follow and the strict build checks that the file exists.
"""

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

from longnet_ref.figures import FIGURES

ROOT = Path(__file__).resolve().parents[1]


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
