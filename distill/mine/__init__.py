"""Unlabeled-data mining for SSLD: the pool, the teacher pass, top-k per class, and dedup against the eval set."""
