"""The embedded dataset shipped with the package (see README.md)."""
