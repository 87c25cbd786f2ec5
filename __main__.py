"""mailroom: a self-hosted mail server for one domain. See README.md and infra/program.py."""

from infra.program import main

main()
