"""The core every room uses: registries, user errors, run records, measurement, the allocator."""
