"""The command line: what the invoke tasks and nox sessions call."""
