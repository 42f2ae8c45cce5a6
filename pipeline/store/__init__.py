"""Storage: fsspec roots (local or s3://), the layout of runs, caches and pointers, leases,
garbage collection, and secret redaction."""
