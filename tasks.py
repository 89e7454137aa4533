"""Invoke entry point: `invoke --list`. The tasks live in gpustack_offline.invoke_tasks."""

from gpustack_offline.invoke_tasks import namespace

ns = namespace()
