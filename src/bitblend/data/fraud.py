"""A SYNTHETIC fraud-detection set pairing text, a rendered receipt image and amount features.

Nothing here is real transaction data. The generative process, so results can be read:

1. Three independent latent risk factors per example, each N(0, 1):
   t (merchant/description), v (receipt), f (transaction numbers).
2. Text: a merchant category drawn by t (high t -> crypto exchange, gift cards, wire
   transfer...; low t -> grocery, pharmacy...), plus urgency words with probability rising
   with t. Template: "<adverb> payment to <merchant> in <city> <note>".
3. Image: a 16x16 grayscale receipt rendered with Pillow: item lines (count random), and a
   dark "manual override" stamp in the lower right whose size grows with v; Gaussian noise.
   10% of receipts are missing (all NaN): the model must cope without them.
4. Tabular: amount (log-normal, larger with f), hour of day (night more likely with f),
   account age in days (younger with f), items, distance from home; 5% of values missing.
5. Label: fraud when t + v + f + N(0, 0.5) > 1.6 (about 12% fraud). Each modality alone
   carries a third of the signal; together they carry all of it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from bitblend.data.table import SourceData, Table

SAFE = ["grocery store", "pharmacy", "coffee shop", "bookstore", "bakery", "gas station"]
RISKY = ["crypto exchange", "gift card shop", "wire transfer service", "electronics resale"]
CITIES = ["Leeds", "Lyon", "Porto", "Lagos", "Minsk", "Macau", "Quito", "Oslo"]
FEATURES = ["amount", "log_amount", "hour", "account_age_days", "items", "distance_km"]
SIZE = 16


def _receipt(rng: np.random.Generator, v: float) -> np.ndarray:
    img = Image.new("L", (SIZE, SIZE), color=235)
    draw = ImageDraw.Draw(img)
    for k in range(int(rng.integers(2, 6))):
        y = 2 + 2 * k
        draw.line([(2, y), (2 + int(rng.integers(5, 12)), y)], fill=60)
    stamp = int(np.clip(round(1.5 * v + 2), 0, 6))  # bigger stamp: riskier receipt
    if stamp:
        draw.rectangle([SIZE - 1 - stamp, SIZE - 1 - stamp, SIZE - 2, SIZE - 2], fill=20)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr + rng.normal(0, 0.05, arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 1.0)[..., None]


def generate_fraud(n: int = 2000, seed: int = 0) -> SourceData:
    """`n` synthetic transactions; deterministic for a seed. Labels 'legit' / 'fraud'."""
    rng = np.random.default_rng([seed, 31337])
    t, v, f = rng.normal(size=(3, n))
    fraud = t + v + f + rng.normal(0, 0.5, n) > 1.6
    texts = []
    for i in range(n):
        risky = rng.random() < 1 / (1 + np.exp(-2.0 * (t[i] - 0.8)))
        merchant = rng.choice(RISKY if risky else SAFE)
        adverb = "URGENT" if rng.random() < 1 / (1 + np.exp(-(t[i] - 1.0))) else "card"
        note = "overseas, new device" if t[i] > 1.2 and rng.random() < 0.6 else "as usual"
        texts.append(f"{adverb} payment to {merchant} in {rng.choice(CITIES)} {note}")
    images = np.stack([_receipt(rng, v[i]) for i in range(n)])
    images[rng.random(n) < 0.10] = np.nan  # missing receipts
    amount = np.exp(rng.normal(3.5 + 0.6 * f, 0.8))
    hour = np.mod(np.round(14 + 5 * rng.normal(size=n) + 4 * f), 24)
    age = np.maximum(1.0, np.exp(rng.normal(6.0 - 0.7 * f, 0.7)))
    items = rng.integers(1, 8, n).astype(np.float64)
    distance = np.exp(rng.normal(1.5 + 0.5 * f, 1.0))
    tab = np.stack([amount, np.log(amount), hour, age, items, distance], axis=1).astype(np.float32)
    tab[rng.random(tab.shape) < 0.05] = np.nan  # missing values
    labels = ["fraud" if y else "legit" for y in fraud]
    return SourceData(
        Table(labels=labels, text=texts, image=images.astype(np.float32), tabular=tab),
        feature_names=FEATURES,
        label_names=["legit", "fraud"],
        synthetic=True,
        description="SYNTHETIC fraud: transaction description + receipt image + amounts",
    )
