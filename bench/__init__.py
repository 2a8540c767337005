"""jobsvc's benchmarks, beside the patterns and peers it replaces: ``python -m bench``."""
