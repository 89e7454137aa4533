"""Verification in clean containers with no route out: pip, docker, egress audit."""
