"""`gpt2 serve`: an OpenAI-compatible server. `engine` (continuous batching, no web framework), `protocol` (the
request schema and its checks), `app` (FastAPI routes) and `server` (uvicorn, loading, Ctrl-C).

FastAPI and uvicorn are the optional extra `serve`; only `app` and `server` import them.
"""
