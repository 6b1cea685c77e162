"""Test fixtures and labelled data shared by tests and benchmarks."""
