"""The one place that adapts the ``lvis`` 0.5.3 reference API (LVIS's official evaluator).

Imported only when the ``lvis`` evaluation backend is used. Three problems are handled here:

1. ``lvis/eval.py`` calls ``np.float`` (``LVISEval.accumulate``), an alias that NumPy 1.24
   removed, so the official evaluator crashes on any current NumPy. Rather than restoring
   ``numpy.float`` for the whole process, ``lvis.eval``'s module-level ``np`` is replaced by a
   view of NumPy that adds the four removed aliases (``float``, ``int``, ``bool``, ``object``,
   which were the builtins). Nothing else in the process sees them.
2. ``import lvis`` calls ``logging.basicConfig`` (it installs a root handler); that is undone
   when this module is the one importing ``lvis``, because a library must not configure
   logging.
3. ``LVIS`` only reads a path and ``LVISResults`` deep-copies the whole ground truth;
   :func:`lvis_from_dict` and :func:`lvis_results` build both from in-memory data (the same
   ``_create_index`` the constructors run), so evaluation can go in chunks without copies.
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np

_REMOVED_ALIASES = {"float": float, "int": int, "bool": bool, "object": object}


class _NumpyWithRemovedAliases(types.ModuleType):
    """``numpy`` plus the aliases removed in NumPy 1.24; every other name is NumPy's own."""

    def __getattr__(self, name: str):
        return getattr(np, name)


def _numpy_view() -> types.ModuleType:
    view = _NumpyWithRemovedAliases("numpy")
    for name, value in _REMOVED_ALIASES.items():
        setattr(view, name, value)
    return view


def _import_lvis() -> types.ModuleType:
    first_import = "lvis" not in sys.modules
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import lvis.eval  # noqa: F401  (the package import runs logging.basicConfig)

    if first_import:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return sys.modules["lvis"]


def lvis_api():
    """Return ``(LVIS, LVISResults, LVISEval)`` from the patched ``lvis`` package."""
    lvis = _import_lvis()
    if not isinstance(lvis.eval.np, _NumpyWithRemovedAliases):
        lvis.eval.np = _numpy_view()
    return lvis.LVIS, lvis.LVISResults, lvis.LVISEval


def lvis_from_dict(dataset: dict):
    """An ``lvis.LVIS`` ground-truth object over ``dataset`` (a dict with images, annotations,
    categories), without the round trip through a file."""
    LVIS, _, _ = lvis_api()
    gt = LVIS.__new__(LVIS)
    gt.logger = logging.getLogger("lvis.lvis")
    gt.dataset = dataset
    gt._create_index()
    return gt


def lvis_results(gt, annotations: list[dict]):
    """An ``lvis.LVISResults`` over already prepared detections.

    ``annotations`` must already be what ``LVISResults.__init__`` would make of them: at most
    ``max_dets`` per image (top scores), each with ``id``, ``area`` (box area) and ``bbox``.
    The ground truth's images and categories are shared, not deep-copied.
    """
    _, LVISResults, _ = lvis_api()
    res = LVISResults.__new__(LVISResults)
    res.logger = logging.getLogger("lvis.results")
    res.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                   "annotations": annotations}
    res._create_index()
    return res
