"""Dataset adapter plug-ins: each module reads one dataset's real on-disk format into the common manifest
and registers its adapter with `@register_adapter` (bench/data/adapter.py says what an adapter declares)."""
