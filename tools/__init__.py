"""Developer tools: running the daemon for tests, conformance and benchmarks."""
