"""Evaluation: what a protocol is and how one runs (`protocol.py`), the protocols themselves (plug-ins in
`protocols/`), the frozen-feature cache, metrics, statistics and the zero-shot prompt sets."""
