"""arx serve: an OpenAI-compatible HTTP server over a continuous-batching scheduler.

`scheduler` (numpy + the runtime only) is the loop policy; `api` (FastAPI) speaks HTTP to it.
"""
