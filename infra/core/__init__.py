"""The pure core: settings, fixed facts, modes, DNS records and the rendered server files. Nothing here
imports Pulumi, a provider SDK or the lab (tests/unit/test_layout.py enforces it)."""
