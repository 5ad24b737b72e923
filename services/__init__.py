"""The four Alliance Stream services and the operator CLI."""
