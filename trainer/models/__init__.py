"""Model facts and loading: the catalogue of known models and their kept configs (known.py,
architectures/), facts read from config.json without torch (config.py) and the parameter counts
worked out from it (parameters.py), loading the base model and its adapters (loading.py),
per-document attention for packed rows (document_attention.py), FLOPs per token and the GPU peak
table (flops.py), and the tiny model the tests and the quickstart build (tiny.py)."""
