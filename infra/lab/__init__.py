"""The lab: the droplet rehearsed on this machine (see infra/lab/control.py)."""
