"""The bundle: assemble, SBOM, provenance, signing, volumes, release, compare."""
