"""An example third-party lbtwist plugin (see plugin.py)."""
