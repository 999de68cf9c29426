"""Benchmarks behind `cp-data bench`: each module has run(**kwargs) -> dict and main()."""
