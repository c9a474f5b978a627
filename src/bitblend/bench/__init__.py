"""Benchmarks run from the CLI: they drive whole runs, so they sit above train/ and runs/.

suite.py   `bitblend bench`: short runs (precision recipes x mixing strategies) in one table
infer.py   `bitblend bench-infer`: latency, throughput and accuracy per serving precision
"""
