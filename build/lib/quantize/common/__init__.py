"""What every stage shares: the one user-facing exception, console output, the cache folder, files and their
provenance (hashes, versions, staged output folders)."""
