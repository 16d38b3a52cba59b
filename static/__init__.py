"""The live page and its vendored scripts, shipped inside the package (see setup.py)."""
