"""Evaluation protocol plug-ins, one module each, found by `bench.core.registry.PROTOCOLS`
(bench/evaluation/protocol.py says what a protocol declares)."""
