"""`shunter serve`: an OpenAI-compatible HTTP server whose concurrent requests share each engine step.

kv_pool.py    the KV cache slots of the sequences in flight (one row each, one shared write column)
scheduler.py  continuous batching on one engine thread: admit, prefill, one decode step for all
text.py       incremental detokenisation and stop strings
metrics.py    Prometheus metrics
app.py        the FastAPI app: OpenAI request and response shapes, streaming, errors
"""
