"""mailroom: a self-hosted mail server for one domain. See README.md and infra/cloud/program.py."""

from infra.cloud.program import main

main()
