"""Benchmarks of the mail stack on a lab host, per spam filter mode, webmail on.

For each mode, one fresh lab (`infra.lab.deploy.up`: the program's own user-data and remote
commands on a Debian 12 host) and, in this order:

1. memory  PSS and RSS of every systemd unit of the host after the deploy; right after the
           inbound benchmarks below have put more than 1,000 messages through it (peak); and
           once the per-connection processes have gone idle and exited (steady state).
2. latency inbound on port 25 (STARTTLS, one connection per message, as another domain's server
           sends), messages of realistic size (a few KB of text, tens of KB of HTML, a few
           hundred KB with an attachment), from the start of the SMTP session to the message
           being visible over IMAP (STATUS INBOX and Junk); the SMTP part (to the 250 after
           DATA, which includes the milters' work) apart.
3. throughput Postfix's own `smtp-source` (4 KB messages, no TLS: it speaks none) with 1, 4 and
           16 parallel sessions: accepted/s, delivered/s (until the last one is visible over
           IMAP), the queue left when sending ended, messages lost (must be 0) and the host's
           CPU seconds per message (every process on the host, reaped children included).
4. submission authenticated on 587 (STARTTLS) until the relay stand-in has it; DKIM-signed or not.
5. convergence the program's remote commands again: no change (time, daemons reloaded), a one-line
           Postfix change (message size limit), and (SpamAssassin run) a switch to rspamd while
           inbound mail keeps arriving (time, replies, messages lost).

Then, in the same run and on the same host, the same latency and throughput with no milter at
all (the stack without its spam filter and DKIM: `smtpd_milters` emptied, main.cf restored
byte for byte afterwards), and, on this machine, the floor: a plain Postfix delivering to
Maildir (bench.floor). Figures are therefore ratios as well as times.

Run: `.venv/bin/python -m bench.mailstack [--modes spamassassin,rspamd] [--messages 200]
[--quick] [--out DIR]`. Needs root (the lab). Results: `<out>/<UTC>-mailstack.json` and the
keys "spamassassin", "rspamd", "floor" of `<out>/latest.json`. No figure is checked here.
"""

from __future__ import annotations

import datetime as dt
import email.message
import email.utils
import imaplib
import json
import random
import re
import smtplib
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import floor
from bench.program import bench_parser, record
from infra.core.facts import IMAPS_PORT, SMTP_PORT, SUBMISSION_PORT
from infra.core.stack import stack_config
from infra.lab import deploy, host, network
from infra.lab.mail import unverified
from infra.lab.network import BULK_DOMAIN, REMOTE_DOMAIN, REMOTE_IP, WORLD_NS
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4

PROBE = Path(__file__).with_name("guest_probe.py")
MODES = ("spamassassin", "rspamd")
CONCURRENCY = (1, 4, 16)
USER = "alice@example.net"
# Units of the mail stack (the rest of the host: systemd, journald, cron, sshd, the session).
STACK_UNITS = (
    "postfix", "dovecot", "opendkim", "spamd", "spamass-milter", "rspamd", "redis-server", "nginx",
    "php8.2-fpm", "unbound", "fail2ban", "postfix-mta-sts-resolver",
)  # fmt: skip
WORDS = tuple(
    [
        "meeting",
        "agenda",
        "invoice",
        "project",
        "update",
        "schedule",
        "review",
        "budget",
        "travel",
        "report",
        "draft",
        "notes",
        "team",
        "quarter",
        "plan",
        "thanks",
        "regards",
        "lunch",
        "tomorrow",
        "friday",
        "attached",
        "minutes",
        "office",
        "client",
        "proposal",
    ]
)


# --- what is sent ---------------------------------------------------------------------------------


def text(rng: random.Random, size: int) -> str:
    lines, length = [], 0
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines) + "\n"


def realistic(rng: random.Random, i: int) -> email.message.EmailMessage:
    """Six in ten a few KB of text, three in ten an HTML newsletter of tens of KB, one in ten
    a letter with an attachment of a few hundred KB."""
    msg = email.message.EmailMessage()
    msg["From"], msg["To"] = f"dana@{REMOTE_DOMAIN}", USER
    msg["Subject"] = f"bench {i}: " + " ".join(rng.choice(WORDS) for _ in range(4))
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain=REMOTE_DOMAIN)
    kind = rng.random()
    if kind < 0.6:
        msg.set_content(text(rng, rng.randint(1_500, 8_000)))
    elif kind < 0.9:
        body = text(rng, rng.randint(10_000, 60_000))
        msg.set_content(body)
        msg.add_alternative("<html><body>" + "".join(f"<p>{p}</p>" for p in body.splitlines()) + "</body></html>",
                            subtype="html")  # fmt: skip
    else:
        msg.set_content(text(rng, 2_000))
        payload = rng.randbytes(rng.randint(100_000, 300_000))
        msg.add_attachment(payload, maintype="application", subtype="pdf", filename="report.pdf")
    return msg


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1], "n": len(ordered)}


# --- the host ---------------------------------------------------------------------------------------


def probe(info: LabInfo) -> dict[str, Any]:
    result = subprocess.run(host.ssh_argv(info, "sudo python3 -"), input=PROBE.read_text(), capture_output=True,
                            text=True, check=True, timeout=60)  # fmt: skip
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def memory(figures: dict[str, Any]) -> dict[str, Any]:
    """PSS/RSS (MiB) per stack daemon and in total; the rest of the host apart."""
    daemons: dict[str, dict[str, float]] = {}
    other = {"pss_mib": 0.0, "rss_mib": 0.0}
    for unit, f in figures["units"].items():
        name = unit.removesuffix(".service").removesuffix("@-")
        entry = {"pss_mib": f["pss_kib"] / 1024, "rss_mib": f["rss_kib"] / 1024, "processes": f["processes"]}
        if name in STACK_UNITS:
            daemons[name] = entry
        else:
            other["pss_mib"] += entry["pss_mib"]
            other["rss_mib"] += entry["rss_mib"]
    return {
        "daemons": daemons,
        "total_pss_mib": sum(d["pss_mib"] for d in daemons.values()),
        "total_rss_mib": sum(d["rss_mib"] for d in daemons.values()),
        "rest_of_host": other,
    }


def imap_count(imap: imaplib.IMAP4) -> int:
    total = 0
    for folder in ("INBOX", "Junk"):
        _, data = imap.status(folder, "(MESSAGES)")
        total += int(data[0].split(b"MESSAGES ")[1].split(b")")[0]) if data[0] else 0
    return total


def imap_session(info: LabInfo) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=60)
    imap.login(USER, info.passwords[USER])
    return imap


def stored_ids(info: LabInfo) -> list[str]:
    def fetch() -> list[str]:
        ids = []
        with imap_session(info) as imap:
            for folder in ("INBOX", "Junk"):
                _, data = imap.select(folder, readonly=True)
                if data[0] == b"0":
                    continue
                _, fetched = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                for part in fetched:
                    if isinstance(part, tuple):
                        ids.append(part[1].decode(errors="replace").partition(":")[2].strip())
        return ids

    return network.in_netns(WORLD_NS, fetch)


# --- 2. inbound latency ---------------------------------------------------------------------------------


def inbound_latency(info: LabInfo, count: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - a repeatable corpus, not a secret
    corpus = [realistic(rng, i) for i in range(count)]

    def run() -> tuple[list[float], list[float], list[int]]:
        smtp_ms, visible_ms, sizes = [], [], []
        tls = unverified()  # made once, as a sending MTA does: loading the CA store takes ≈ 25 ms
        with imap_session(info) as imap:
            for msg in corpus:
                seen = imap_count(imap)
                raw = msg.as_bytes()
                sizes.append(len(raw))
                started = time.perf_counter()
                with smtplib.SMTP(DROPLET_IPV4, SMTP_PORT, local_hostname=f"mx.{REMOTE_DOMAIN}",
                                  source_address=(REMOTE_IP, 0), timeout=60) as smtp:  # fmt: skip
                    smtp.starttls(context=tls)
                    smtp.sendmail(msg["From"], [USER], raw)
                    accepted = time.perf_counter()
                while imap_count(imap) <= seen:
                    if time.perf_counter() - started > 60:
                        raise RuntimeError(f"{msg['Message-ID']} not visible over IMAP within 60 s")
                    time.sleep(0.001)
                visible = time.perf_counter()
                smtp_ms.append((accepted - started) * 1000)
                visible_ms.append((visible - started) * 1000)
        return smtp_ms, visible_ms, sizes

    smtp_ms, visible_ms, sizes = network.in_netns(WORLD_NS, run)
    return {
        "visible_ms": percentiles(visible_ms),
        "smtp_ms": percentiles(smtp_ms),
        "size_bytes": {"median": statistics.median(sizes), "max": max(sizes), "total": sum(sizes)},
    }


def filter_profile(info: LabInfo, mode: str, last: int) -> dict[str, Any]:
    """What the spam filter itself says each of the LAST inbound messages cost: rspamd logs its
    scan time (ms) and DNS requests per message, spamd its scan time (in tenths of a second)."""
    if mode == "rspamd":
        log = host.guest("sudo grep rspamd_task_write_log /var/log/rspamd/rspamd.log "
                            f"| grep -v 'settings_id: authenticated' | tail -n {last}", info).stdout  # fmt: skip
        dns = [int(n) for n in re.findall(r"dns req: (\d+)", log)]
        times = [float(t) for t in re.findall(r"time: ([0-9.]+)ms", log)]
        return {"scan_ms": percentiles(times), "dns_requests_median": statistics.median(dns) if dns else None}
    log = host.guest("sudo journalctl -u spamd -o cat --no-pager | grep -E 'clean message|identified spam' "
                        f"| tail -n {last}", info).stdout  # fmt: skip
    times = [float(t) * 1000 for t in re.findall(r" in ([0-9.]+) seconds", log)]
    return {"scan_ms": percentiles(times), "resolution_ms": 100}


# --- 3. inbound throughput ------------------------------------------------------------------------------


def queue_size(info: LabInfo) -> int:
    out = host.guest("sudo postqueue -j", info).stdout
    return len([line for line in out.splitlines() if line.strip()])


def smtp_source_argv(sessions: int, messages: int, subject: str) -> list[str]:
    return ["ip", "netns", "exec", WORLD_NS, "smtp-source", "-s", str(sessions), "-m", str(messages),
            "-l", "4096", "-M", f"mx.{REMOTE_DOMAIN}", "-f", f"load@{BULK_DOMAIN}", "-t", USER,
            "-S", subject, f"{DROPLET_IPV4}:{SMTP_PORT}"]  # fmt: skip


def warm_up(info: LabInfo) -> None:
    """A new client waits out postscreen's greet test (6 s) once, then is remembered: pay that
    for both senders (smtplib from the remote MX's address, smtp-source from the world's first
    address) before any clock starts, and deliver those messages."""
    inbound_latency(info, 1, seed=1)
    subprocess.run(smtp_source_argv(1, 1, "warm-up"), capture_output=True, check=False, timeout=120)


def throughput(info: LabInfo, sessions: int, messages: int) -> dict[str, Any]:
    """smtp-source from the world's first address, as the bulk sender (its SPF lists that address,
    so its mail passes DMARC), into port 25; counted until all visible."""
    before_cpu = probe(info)["cpu_s"]
    baseline = network.in_netns(WORLD_NS, lambda: _count_now(info))
    started = time.perf_counter()
    sent = subprocess.run(smtp_source_argv(sessions, messages, f"throughput {sessions}"), capture_output=True,
                          text=True, check=False, timeout=600)  # fmt: skip
    sending_s = time.perf_counter() - started
    backlog = queue_size(info)

    def wait_visible() -> int:
        with imap_session(info) as imap:
            deadline = time.perf_counter() + 300
            while (now := imap_count(imap)) < baseline + messages and time.perf_counter() < deadline:
                time.sleep(0.01)
            return now - baseline

    delivered = network.in_netns(WORLD_NS, wait_visible)
    delivering_s = time.perf_counter() - started
    cpu = probe(info)["cpu_s"] - before_cpu
    return {
        "sessions": sessions,
        "messages": messages,
        "smtp_source_exit": sent.returncode,
        "accepted_msgs_per_s": messages / sending_s,
        "delivered_msgs_per_s": delivered / delivering_s,
        "queue_when_sending_ended": backlog,
        "lost": messages - delivered,
        "host_cpu_ms_per_msg": cpu * 1000 / max(delivered, 1),
    }


def _count_now(info: LabInfo) -> int:
    with imap_session(info) as imap:
        return imap_count(imap)


# --- 4. submission ---------------------------------------------------------------------------------------


def submission(info: LabInfo, count: int, seed: int = 11) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - a repeatable corpus, not a secret
    spool = Path(info.ses_spool)
    password = info.passwords[USER]

    def run() -> tuple[list[float], int]:
        times, signed = [], 0
        tls = unverified()  # made once, as a mail client does
        for i in range(count):
            msg = email.message.EmailMessage()
            msg["From"], msg["To"] = USER, f"dana@{REMOTE_DOMAIN}"
            msg["Subject"], msg["Date"] = f"submission {i}", email.utils.formatdate()
            msg["Message-ID"] = email.utils.make_msgid(domain="example.net")
            msg.set_content(text(rng, rng.randint(1_500, 8_000)))
            before = set(spool.glob("*.json"))
            started = time.perf_counter()
            with smtplib.SMTP(DROPLET_IPV4, SUBMISSION_PORT, timeout=60) as smtp:
                smtp.starttls(context=tls)
                smtp.login(USER, password)
                smtp.send_message(msg)
            while not (new := set(spool.glob("*.json")) - before):
                if time.perf_counter() - started > 60:
                    raise RuntimeError("the relay stand-in received nothing within 60 s")
                time.sleep(0.001)
            times.append((time.perf_counter() - started) * 1000)
            raw = next(iter(new)).with_suffix(".eml").read_bytes()
            signed += b"DKIM-Signature:" in raw
        return times, signed

    times, signed = network.in_netns(WORLD_NS, run)
    return {"relayed_ms": percentiles(times), "dkim_signed": signed, "messages": count}


# --- 5. convergence ----------------------------------------------------------------------------------------


def applied(steps: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    step = next(s for s in steps if s["name"] == "server-apply-bundle")
    result: dict[str, Any] = json.loads(step["stdout"])
    return step["seconds"], result


def convergence(info: LabInfo, switch_to: str | None) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    seconds, result = applied(deploy.redeploy())
    figures["no_change"] = {"apply_s": seconds, "all_commands_s": time.perf_counter() - started,
                            "reloaded": result["reloaded"], "changed": result["changed"]}  # fmt: skip
    # One alias more: a line in Postfix's alias map and one in its sender-login map, nothing else.
    # (The message size limit would be one main.cf line, but with webmail on it also sets nginx's
    # upload limit, so nginx is reloaded too, rightly.)
    aliases = [*stack_config(info.stack, info.overrides).get("aliases", []), "bench@example.net: alice@example.net"]
    started = time.perf_counter()
    seconds, result = applied(deploy.redeploy({"aliases": aliases}))
    figures["one_postfix_line"] = {"apply_s": seconds, "all_commands_s": time.perf_counter() - started,
                                   "reloaded": result["reloaded"], "changed": result["changed"]}  # fmt: skip
    deploy.redeploy()
    if switch_to:
        figures["spam_filter_switch"] = switch_under_load(info, switch_to)
    return figures


def switch_under_load(info: LabInfo, switch_to: str) -> dict[str, Any]:
    """Inbound mail every 0.2 s while the program switches the spam filter; every message a
    server accepted must be stored, the others were temp-failed (a sender would try again)."""
    stop = threading.Event()
    replies: dict[str, int] = {}

    def load() -> None:
        i = 0
        while not stop.is_set():
            msg = email.message.EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = f"dana@{REMOTE_DOMAIN}", USER, f"during switch {i}"
            msg["Message-ID"] = email.utils.make_msgid(domain=REMOTE_DOMAIN)
            msg.set_content("Mail while the spam filter changes.\n")
            try:
                with smtplib.SMTP(DROPLET_IPV4, SMTP_PORT, local_hostname=f"mx.{REMOTE_DOMAIN}",
                                  source_address=(REMOTE_IP, 0), timeout=60) as smtp:  # fmt: skip
                    smtp.send_message(msg)
                replies[msg["Message-ID"]] = 250
            except smtplib.SMTPResponseException as exc:
                replies[msg["Message-ID"]] = exc.smtp_code
            except smtplib.SMTPRecipientsRefused as exc:
                replies[msg["Message-ID"]] = min(code for code, _ in exc.recipients.values())
            except (smtplib.SMTPException, OSError):
                replies[msg["Message-ID"]] = 0
            i += 1
            time.sleep(0.2)

    sender = threading.Thread(target=lambda: network.in_netns(WORLD_NS, load))
    sender.start()
    started = time.perf_counter()
    try:
        seconds, result = applied(deploy.redeploy({"spamFilter": switch_to}))
    finally:
        stop.set()
        sender.join(120)
    total = time.perf_counter() - started
    accepted = {m for m, code in replies.items() if code == 250}
    deadline = time.monotonic() + 120
    while not accepted <= set(stored_ids(info)) and time.monotonic() < deadline:
        host.guest("sudo postqueue -f", info)
        time.sleep(2)
    stored = stored_ids(info)
    codes: dict[str, int] = {}
    for code in replies.values():
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {
        "to": switch_to,
        "apply_s": seconds,
        "all_commands_s": total,
        "reloaded": result["reloaded"],
        "installed": result["installed"],
        "removed_packages": result["removed_packages"],
        "replies": codes,
        "lost": len(accepted - set(stored)),
        "stored_twice": len([m for m in accepted if stored.count(m) > 1]),
    }


# --- a mode, and no filter on the same host ---------------------------------------------------------


def without_milters(info: LabInfo, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """MEASURE with Postfix's milters switched off (no spam filter, no DKIM); main.cf restored."""
    host.guest("sudo cp -p /etc/postfix/main.cf /run/main.cf.bench", info)
    try:
        host.guest("sudo postconf -e 'smtpd_milters =' 'non_smtpd_milters =' && sudo postfix reload", info)
        return measure()
    finally:
        host.guest("sudo cp -p /run/main.cf.bench /etc/postfix/main.cf && sudo postfix reload", info)


def settle(info: LabInfo, quick: bool) -> None:
    """Steady state after the load: the per-connection processes (smtpd, cleanup, lmtp; Dovecot's
    lmtp and imap) exit once idle for Postfix's max_idle (100 s) or Dovecot's idle_kill (60 s)."""
    idle = int(host.guest("/usr/sbin/postconf -h max_idle", info).stdout.strip().rstrip("s") or 100)
    time.sleep(1 if quick else idle + 10)


def run_mode(
    mode: str, messages: int, sizes: dict[str, int], switch_to: str | None, quick: bool = False
) -> dict[str, Any]:
    deploy.down()
    info = deploy.up("dev", {"spamFilter": mode, "webmail": True})
    try:
        time.sleep(5)  # let the daemons settle after the deploy (rspamd loads its maps lazily)
        figures: dict[str, Any] = {"memory_after_start": memory(probe(info))}
        warm_up(info)
        figures["inbound_latency"] = inbound_latency(info, messages)
        figures["filter_profile"] = filter_profile(info, mode, messages)
        figures["throughput"] = [throughput(info, s, sizes[f"c{s}"]) for s in CONCURRENCY]
        figures["memory_at_peak"] = memory(probe(info))
        settle(info, quick)
        figures["memory_after_load"] = memory(probe(info))
        figures["messages_before_memory_after_load"] = messages + 2 + sum(sizes.values())
        figures["submission"] = submission(info, max(10, messages // 4))
        figures["no_filter"] = without_milters(info, lambda: {
            "inbound_latency": inbound_latency(info, max(10, messages // 2), seed=3),
            "throughput": [throughput(info, s, sizes[f"c{s}"]) for s in (1, 4)],
        })  # fmt: skip
        figures["convergence"] = convergence(info, switch_to)
        return summarize(figures)
    finally:
        deploy.down()


def summarize(figures: dict[str, Any]) -> dict[str, Any]:
    """The stable names (pss_mib, inbound_p50_ms, inbound_msgs_per_s, lost) beside the details."""
    best = max(figures["throughput"], key=lambda t: t["delivered_msgs_per_s"])
    floorless = max(figures["no_filter"]["throughput"], key=lambda t: t["delivered_msgs_per_s"])
    return {
        "pss_mib": figures["memory_after_load"]["total_pss_mib"],
        "inbound_p50_ms": figures["inbound_latency"]["visible_ms"]["p50"],
        "inbound_p95_ms": figures["inbound_latency"]["visible_ms"]["p95"],
        "inbound_msgs_per_s": best["delivered_msgs_per_s"],
        "lost": sum(t["lost"] for t in figures["throughput"]),
        "submission_p50_ms": figures["submission"]["relayed_ms"]["p50"],
        "no_filter_inbound_p50_ms": figures["no_filter"]["inbound_latency"]["visible_ms"]["p50"],
        "no_filter_inbound_msgs_per_s": floorless["delivered_msgs_per_s"],
        **figures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("mailstack", __doc__, "a few messages of each, for the smoke test")
    parser.add_argument("--modes", default=",".join(MODES), help="spam filter modes (default: both)")
    parser.add_argument("--messages", type=int, default=200, help="messages for the latency figures (default 200)")
    args = parser.parse_args(argv)
    messages = 3 if args.quick else args.messages
    sizes = {"c1": 5, "c4": 8, "c16": 16} if args.quick else {"c1": 200, "c4": 400, "c16": 800}
    figures: dict[str, Any] = {}
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        switch_to = "rspamd" if mode == "spamassassin" else None
        print(f"bench: {mode} ...", flush=True)
        figures[mode] = run_mode(mode, messages, sizes, switch_to, args.quick)
    print("bench: the floor, plain Postfix to Maildir ...", flush=True)
    figures["floor"] = floor.measure(20 if args.quick else 2000)
    now = dt.datetime.now(dt.UTC)
    path = record(args.out, figures, now, name="mailstack")
    print(f"bench: results in {path}")
    for mode in modes:
        f = figures[mode]
        print(f"  {mode}: PSS {f['pss_mib']:.0f} MiB, inbound p50 {f['inbound_p50_ms']:.0f} ms, "
              f"{f['inbound_msgs_per_s']:.1f} msg/s, lost {f['lost']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
