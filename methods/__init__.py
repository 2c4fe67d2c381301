"""Method plugins. Each module registers itself with `bench.core.registry.register_method`."""
