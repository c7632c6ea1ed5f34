"""Fixtures of the task tests: a tiny BERT directory and a tiny CSV (see tiny_task.py)."""

from __future__ import annotations

import pytest
from tiny_task import make_bert_dir, write_rows


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return make_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def rows_csv(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "tiny.csv")
