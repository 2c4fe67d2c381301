"""Method plugins. Each module registers itself with `bench.registry.register_method`."""
