"""Integrations with other frameworks, each an optional extra imported only when used.

- `dgate_export.integrations.ray`: offline scoring on Ray Data (`pip install 'dgate-export[ray]'`).
"""
