"""Local persistence: atomic file writes and the SQLite time series."""
