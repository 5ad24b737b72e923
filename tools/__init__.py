"""Development tools: everything that is not the product.

The run command, the benches, the simulator, the local broker/store launcher, process helpers,
event generators for benches and tests, and the docs generator. Tools import the services and
shared/; services/ and shared/ never import tools/ (tests/unit/test_architecture.py), so the
production image runs without it.
"""
