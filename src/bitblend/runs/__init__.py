"""Loading a finished run and using it: what eval, predict, ensemble, merge, distill and
bench-infer share.

base.py         the `Predictor` protocol every kind of run answers, task lookup, labelled files
load.py         `run_kind` / `load_run`: the one place that tells the kinds of run apart
transformer.py  a transformer run (model/ in transformers layout + heads), in a serving precision
serving.py      serving precisions (run, fp32, bf16, int8) and int8 quantisation
tfidf.py        a `model.backbone: tfidf-logreg` run (scikit-learn weights, no pickle)
spec.py         a saved ensemble spec (ensemble.json): members, combiner, temperature
combine.py      the ensemble combiners (fitted by `bitblend ensemble`, applied here)
evaluate.py     `bitblend eval` / `predict` on any kind of run

Layering: runs/ uses train/ (batching, scoring) and the layers below; ensemble/, the CLI and
the benchmarks use runs/; nothing here imports them.
"""
