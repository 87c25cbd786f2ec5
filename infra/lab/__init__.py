"""The lab: `pulumi up` rehearsed on this machine.

`infra.lab.control` runs the Pulumi program for a stack under mocks, boots a Debian 12 host
(`infra.lab.image`, systemd-nspawn) from the droplet's own user-data, stands in for the outside
world in a second network namespace (`infra.lab.world`: DNS, SES, Cloudflare's API; pebble as
the ACME CA, `infra.lab.acme`; the world's certificates from `infra.lab.pki`), and runs the
program's own remote commands over SSH. `infra.lab.mail` is mail through it, from the outside.
"""
