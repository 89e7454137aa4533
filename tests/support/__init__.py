"""Test helpers: loopback stand-ins for the upstreams and their fixtures, loaded by
tests/conftest.py through `pytest_plugins`. Import helpers as `from support.X import Y`."""
