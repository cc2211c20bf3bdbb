"""The graph-rewriting helpers live in export/graph_edit.py (the bundle's general-step graph is
written with them at export, and export/ must not import builder/); re-exported for builder/."""

from arx.export.graph_edit import (GraphEditor, consumers, initializer,  # noqa: F401
                                   producers, prune, topological_sort)
