"""MkDocs hook: the build fails if a generated figure is missing (``longnet-ref pattern`` draws them)."""

from pathlib import Path

from mkdocs.exceptions import PluginError

from longnet_ref.figures import FIGURES


def on_pre_build(config, **kwargs):
    figures = Path(config["docs_dir"]) / "figures"
    missing = [name for name in FIGURES if not (figures / name).is_file()]
    if missing:
        raise PluginError(f"missing figures {missing} in {figures}: run `longnet-ref pattern --output-dir {figures}`")
