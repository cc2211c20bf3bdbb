"""arx.export.

`arx.export.kv_attention` (export/cache_ops.py) is loaded on first use: it imports torch,
which `import arx` and `import arx.export` must not (the runtime installs without it).
"""


def __getattr__(name: str):
    if name == "kv_attention":
        from arx.export.cache_ops import kv_attention

        return kv_attention
    raise AttributeError(f"module 'arx.export' has no attribute {name!r}")
