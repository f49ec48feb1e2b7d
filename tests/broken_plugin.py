"""A query-strategy plug-in module that fails as it is imported (for the spec's error tests)."""

raise RuntimeError("this plug-in module fails as it is imported")
