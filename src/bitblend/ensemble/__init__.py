"""Model-level mixing: classic TF-IDF members, ensembles, weight merging, distillation.

classic.py   `model.backbone: tfidf-logreg` (scikit-learn) as a run directory
calibration.py   probabilities, accuracy / macro-F1 / NLL / ECE / Brier, temperature scaling
combine.py   mean / vote / weighted / stack combiners (fit on validation data only)
spec.py      the saved ensemble spec (ensemble.json) and `bitblend ensemble`
merge.py     `bitblend merge`: uniform and greedy soups, task arithmetic, TIES
distill.py   `bitblend distill`: a student trained on a teacher's softened outputs
"""
