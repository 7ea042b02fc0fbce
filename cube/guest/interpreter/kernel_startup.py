"""Run by ipykernel at start (``--IPKernelApp.exec_files``) inside the user's namespace.

It registers the display formatters that give results their E2B formats:

- ``e2b/data``: a pandas DataFrame as ``{column: [values]}`` (timestamps as ISO strings, NaN as
  null), as upstream's template does;
- ``e2b/chart``: a matplotlib Figure as a chart object (``charts.py``, loaded by file path on
  first use so that a kernel which never plots never imports matplotlib);
- ``application/json``: dicts and lists (numpy values made plain), so ``{"a": 1}`` as the last
  expression has a ``json`` result as upstream.

It also patches two modules when they are first imported (a kernel that never plots never
imports them): ``matplotlib.axes``, to remember what ``Axes.bxp`` drew, which is how a boxplot is
told apart from other lines; and ``PIL.Image``, so that saving an image to a file also displays
it, as upstream's template does (code written for E2B gets a saved image back as a PNG result).
Everything lives in one function that deletes itself, so the user's namespace is left as it was;
the modules it loads are never imported under a name a user module could clash with.
"""


def __cube_setup(startup_file: str) -> None:
    import importlib.abc
    import importlib.util
    import math
    import os
    import sys
    from pathlib import Path
    from typing import Any

    import IPython
    import IPython.display
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Unicode

    shell = IPython.get_ipython()
    charts_file = Path(startup_file).with_name("charts.py")

    def load_charts() -> Any:
        module = sys.modules.get("_cube_charts")
        if module is None:
            spec = importlib.util.spec_from_file_location("_cube_charts", charts_file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["_cube_charts"] = module
            spec.loader.exec_module(module)
        return module

    def plain(value: Any) -> Any:
        """JSON-ready: numpy scalars and arrays to Python, NaN and infinities to null."""
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if hasattr(value, "tolist") and not isinstance(value, str):
            return plain(value.tolist())
        if hasattr(value, "isoformat"):
            return value.isoformat()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    def typed_formatter(mime: str, module: str, kind: str, convert: Any) -> BaseFormatter:
        """A formatter for instances of ``module.kind`` that never imports ``module`` itself:
        IPython runs every formatter on every output, and an object of that type can only exist
        once the user has imported it. Other objects may still define ``_repr_e2b_<name>_``."""

        class Formatter(BaseFormatter):
            format_type = Unicode(mime)
            print_method = ObjectName("_repr_" + mime.replace("/", "_") + "_")
            _return_type = (dict, str)

            def __call__(self, obj: Any) -> Any:
                loaded = sys.modules.get(module)
                if loaded is None or not isinstance(obj, getattr(loaded, kind)):
                    return super().__call__(obj)
                try:
                    return plain(convert(obj))
                except Exception:
                    return None  # the other formats (a chart's PNG) are still shown

        return Formatter(parent=shell.display_formatter)

    class PlainJSONFormatter(JSONFormatter):
        def __call__(self, obj: Any) -> Any:
            if isinstance(obj, dict | list):
                try:
                    return plain(obj), {"expanded": True}
                except (TypeError, ValueError, RecursionError):
                    pass
            return super().__call__(obj)

    def remember_boxplots(module: Any) -> None:
        original = module.Axes.bxp

        def bxp(self: Any, *args: Any, **kwargs: Any) -> Any:
            drawn = original(self, *args, **kwargs)
            self.__dict__.setdefault("_cube_boxplots", []).append(drawn)
            return drawn

        module.Axes.bxp = bxp

    def show_saved_images(module: Any) -> None:
        original = module.Image.save

        def save(self: Any, fp: Any, *args: Any, **kwargs: Any) -> Any:
            saved = original(self, fp, *args, **kwargs)
            if isinstance(fp, str | os.PathLike):  # a file object may be anything, even a pipe
                IPython.display.display(self)
            return saved

        module.Image.save = save

    class PatchOnImport(importlib.abc.MetaPathFinder):
        """Runs each module's patch right after the module is first executed."""

        def __init__(self, patches: dict[str, Any]) -> None:
            self.patches = patches

        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            patch = self.patches.pop(name, None)
            if patch is None:
                return None
            if not self.patches:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)  # this finder no longer answers for name
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module: Any) -> None:
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
            return spec

    formatters = shell.display_formatter.formatters
    formatters["e2b/data"] = typed_formatter(
        "e2b/data", "pandas", "DataFrame", lambda df: df.to_dict(orient="list")
    )
    formatters["e2b/chart"] = typed_formatter(
        "e2b/chart", "matplotlib.figure", "Figure", lambda fig: load_charts().figure_chart(fig)
    )
    formatters["application/json"] = PlainJSONFormatter(parent=shell.display_formatter)
    patches = {"matplotlib.axes": remember_boxplots, "PIL.Image": show_saved_images}
    for name in [name for name in patches if name in sys.modules]:
        patches.pop(name)(sys.modules[name])
    if patches:
        sys.meta_path.insert(0, PatchOnImport(patches))


__cube_setup(__file__)  # IPython sets __file__ while it runs this file
del __cube_setup
