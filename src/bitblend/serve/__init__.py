"""Serving a finished run over HTTP: `bitblend serve` and `bitblend export`.

requests.py  JSON request bodies -> per-task tables (the rows `predict` reads), 4xx errors
batcher.py   dynamic batching: concurrent requests gathered into one forward on one thread
buckets.py   length-bucketed padding of a gathered batch (power-of-two token classes)
metrics.py   Prometheus text-format counters, gauges and histograms (no client library)
onnx.py      `bitblend export --format onnx`: one graph per task, int8 via ONNX Runtime,
             checked against torch; `OnnxRun`, the onnxruntime engine as a Predictor
onnx_fusion.py  ONNX Runtime's transformer fusion of BERT-family graphs (Attention, ...)
app.py       the Starlette application: /v1/predict, /healthz, /readyz, /metrics
server.py    loading the engine and running uvicorn (SIGTERM drains and exits 0)

Layering: serve/ uses runs/ (load_run, the Predictor protocol, predictions) and the layers
below; only the CLI and the benchmarks import it.
"""
