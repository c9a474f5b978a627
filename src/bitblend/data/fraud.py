"""A SYNTHETIC fraud-detection set pairing text, a rendered receipt image and amount features.

Nothing here is real transaction data. The generative process, so that results can be read:

1. Three independent latent risk factors per example, each N(0, 1): `t` (what the
   description says), `v` (what the receipt shows) and `f` (the transaction's numbers).
2. Label: fraud when t + v + f + N(0, 0.5^2) > 1.2, so about 25% fraud. Each modality sees
   only its own factor, so any one of them alone predicts the label better than chance but
   leaves two thirds of the latent variance unexplained; the three together explain it all
   but the N(0, 0.5^2) noise.
3. Text (from `t` only): "<channel> purchase at <merchant> in <city>[, <note>]". Merchants
   and notes are ranked from safe (pharmacy; "weekly shopping") to risky (crypto exchange;
   "urgent transfer requested"); a noisy `t` picks the rank, and high `t` makes "online"
   more likely than "in-store". The city is pure noise.
4. Image (from `v`; 32x32x1 grayscale, drawn with Pillow): paper with a header bar, one
   ink line per item (as many as the `items` feature, so the modalities describe the same
   purchase), a total line, and a dark "manual override" stamp in the lower right whose
   side grows with `v`; a correction slash appears when `v` is high. Random shift of up to
   2 px and Gaussian noise (sd 0.06). 10% of receipts are missing: all NaN.
5. Tabular (from `f`): amount (log-normal, larger with `f`), log_amount, hour (drifts
   towards night with `f`), items (1-7, no signal), account_age_days (younger with `f`),
   distance_km (farther with `f`) and prev_tx_24h (Poisson, more with `f`). 5% of the
   values are missing (NaN; amount and log_amount are missing together).

Deterministic for a seed: every draw comes from one `numpy.random.Generator`. Logistic
regression on simple per-modality features (seed 0, 70/30 split; see
tests/unit/test_builtin_sources.py) reaches held-out AUC 0.74 on text, 0.73 on the image,
0.70 on the amounts and 0.90 on all three together (the latent's own ceiling is 0.77 / 0.98).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError
from bitblend.numeric import sigmoid

# Merchants and notes run from safest to riskiest; the text risk factor picks the rank.
MERCHANTS = ["pharmacy", "grocery store", "bakery", "bookstore", "coffee shop", "gas station",
             "furniture store", "electronics store", "travel agency", "jewellery shop",
             "electronics resale", "prepaid card outlet", "gift card shop", "online casino",
             "wire transfer service", "crypto exchange"]  # fmt: skip
NOTES = ["weekly shopping", "as usual", "receipt kept", "saved card", "first purchase here",
         "card not present", "new device", "urgent transfer requested"]  # fmt: skip
CITIES = ["Leeds", "Lyon", "Porto", "Lagos", "Minsk", "Macau", "Quito", "Oslo", "Perth", "Riga"]
FEATURES = ["amount", "log_amount", "hour", "items", "account_age_days", "distance_km",
            "prev_tx_24h"]  # fmt: skip
SIZE = 32  # receipt images are SIZE x SIZE x 1
THRESHOLD = 1.2  # P(N(0, 3.25) > 1.2) ~ 0.25


def _sigmoid(x: float) -> float:
    return float(sigmoid(x))


def _rank(rng: np.random.Generator, x: float, k: int, spread: float) -> int:
    """A rank in 0..k-1 that rises with `x` (noisy, so words carry x only in part)."""
    return int(np.clip(np.floor((x + rng.normal(0.0, 0.5)) * spread + k / 2), 0, k - 1))


def _description(rng: np.random.Generator, t: float) -> str:
    """A transaction description whose wording depends on the text risk factor `t`."""
    merchant = MERCHANTS[_rank(rng, t, len(MERCHANTS), 3.0)]
    channel = "online" if rng.random() < _sigmoid(1.2 * t) else "in-store"
    text = f"{channel} purchase at {merchant} in {rng.choice(CITIES)}"
    if rng.random() < 0.7:  # not every description carries a note
        text += ", " + NOTES[_rank(rng, t, len(NOTES), 1.5)]
    return text


def _receipt(rng: np.random.Generator, v: float, items: int) -> np.ndarray:
    """(SIZE, SIZE, 1) float32 in [0, 1]: a receipt whose stamp grows with risk factor `v`."""
    img = Image.new("L", (SIZE, SIZE), color=235)
    draw = ImageDraw.Draw(img)
    dx, dy = (int(d) for d in rng.integers(-2, 3, size=2))  # print offset, in pixels
    draw.rectangle([3 + dx, 2 + dy, 28 + dx, 4 + dy], fill=70)  # shop header bar
    for k in range(items):  # one line per item
        y = 7 + 2 * k + dy
        draw.line([(3 + dx, y), (3 + dx + int(rng.integers(6, 16)), y)], fill=60)
    draw.line([(16 + dx, 23 + dy), (28 + dx, 23 + dy)], fill=30, width=2)  # total
    side = int(np.clip(round(3.0 + 2.5 * v), 0, 10))  # bigger stamp: riskier receipt
    if side:
        draw.rectangle([SIZE - 2 - side, SIZE - 2 - side, SIZE - 2, SIZE - 2], fill=15)
    if rng.random() < _sigmoid(2.0 * (v - 1.0)):  # a hand correction across the items
        draw.line([(4 + dx, 18 + dy), (20 + dx, 6 + dy)], fill=25, width=1)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr + rng.normal(0.0, 0.06, arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 1.0)[..., None]


def _amounts(rng: np.random.Generator, f: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(n, len(FEATURES)) float32 transaction numbers driven by risk factor `f`; NaN = missing."""
    n = len(f)
    amount = np.exp(rng.normal(3.5 + 0.8 * f, 0.7))
    hour = np.mod(np.round(13.0 + 4.0 * rng.normal(size=n) + 3.5 * f), 24)
    age = np.maximum(1.0, np.round(np.exp(rng.normal(6.0 - 0.8 * f, 0.7))))
    distance = np.exp(rng.normal(1.5 + 0.7 * f, 0.9))
    prev = rng.poisson(np.exp(0.5 + 0.5 * f)).astype(np.float64)
    cols = [amount, np.log(amount), hour, items.astype(np.float64), age, distance, prev]
    tab = np.stack(cols, axis=1).astype(np.float32)
    missing = rng.random(tab.shape) < 0.05
    missing[:, 1] = missing[:, 0]  # log_amount is missing exactly when amount is
    tab[missing] = np.nan
    return tab


def generate_fraud(n: int = 2000, seed: int = 0) -> SourceData:
    """`n` SYNTHETIC transactions (text, receipt image, amounts); labels 'legit' / 'fraud'."""
    if n < 1:
        raise BitblendError(f"fraud: n must be at least 1, got {n}")
    rng = np.random.default_rng([seed, 31337])
    t, v, f = rng.normal(size=(3, n))
    fraud = t + v + f + rng.normal(0.0, 0.5, n) > THRESHOLD
    items = rng.integers(1, 8, n)
    texts = [_description(rng, float(t[i])) for i in range(n)]
    images = np.stack([_receipt(rng, float(v[i]), int(items[i])) for i in range(n)])
    images[rng.random(n) < 0.10] = np.nan  # missing receipts: masked by the encoder
    return SourceData(
        Table(
            labels=["fraud" if y else "legit" for y in fraud],
            text=texts,
            image=images.astype(np.float32),
            tabular=_amounts(rng, f, items),
        ),
        feature_names=list(FEATURES),
        label_names=["legit", "fraud"],  # legit first: fraud is a binary head's positive class
        synthetic=True,
        description="SYNTHETIC fraud: transaction description + receipt image + amounts",
    )
