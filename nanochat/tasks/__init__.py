"""Chat tasks (upstream nanochat's `tasks/` package, moved inside the library). See common.py for the loader."""
