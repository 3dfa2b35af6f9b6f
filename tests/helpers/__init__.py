"""Helpers shared by the tests: backend lists, EDM's pickle format, offline weight files."""
