"""Core: the matrix, options, errors, files, processes, downloads, Docker."""
