"""What everything else stands on: errors, atomic files and locks, the plug-in registries, setting checks,
hashes, provenance and the results store. Imports nothing else of the harness."""
