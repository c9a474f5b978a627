"""Model-level mixing built on finished runs (runs/): ensembles, weight merging, distillation.

classic.py   `model.backbone: tfidf-logreg` (scikit-learn): fit and write the run directory
spec.py      `bitblend ensemble`: fit a combiner and temperatures, write ensemble.json
merge.py     `bitblend merge`: uniform and greedy soups, task arithmetic, TIES
distill.py   `bitblend distill`: a student trained on a teacher's softened outputs

Loading any finished run (including a saved ensemble spec and a tfidf-logreg run) and the
combiners an ensemble spec predicts with are runs/'s; probabilities, calibration metrics and
temperature scaling are tasks/calibration.py's. Nothing below imports this package.
"""
