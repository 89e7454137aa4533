"""Invoke entry point: `invoke --list`. The tasks live in gpustack_offline.cli.invoke_tasks."""

from gpustack_offline.cli.invoke_tasks import namespace

ns = namespace()
