"""Test support: the stack under test, service processes, namespaces."""
