"""The lab: `pulumi up` rehearsed on this machine.

`infra.lab.deploy` runs the Pulumi program for a stack under mocks, boots a Debian 12 host
(`infra.lab.host`, systemd-nspawn, from the image of `infra.lab.image`) from the droplet's own
user-data, stands in for the outside world in a second network namespace (`infra.lab.network`;
`infra.lab.world` starts it: DNS, SES, Cloudflare's API in `infra.lab.world.servers`; pebble as
the ACME CA, `infra.lab.world.acme`; the world's certificates from `infra.lab.world.pki`), and
runs the program's own remote commands over SSH. `infra.lab.state` is what the lab keeps of
itself between runs. `infra.lab.mail` is mail through it, from the outside.
"""
