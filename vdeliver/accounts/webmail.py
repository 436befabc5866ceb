"""Webmail on the same accounts: Roundcube with its managesieve plugin, in front of Dovecot's
IMAP and ManageSieve, generated from vdeliver's configuration like the Dovecot files.

`vmailctl webmail-config` prints (or, with `--output DIR`, writes under DIR, which plays
/etc) three files:

- `dovecot/conf.d/20-vdeliver-managesieve.conf`: the ManageSieve service (RFC 5804,
  dovecot-managesieved) on a loopback listener, or on another address only behind TLS;
- `dovecot/conf.d/90-vdeliver-sieve.conf`: Pigeonhole's `sieve` location (the layout vdeliver
  runs), `sieve_before`/`sieve_after`, and `sieve_extensions` set to exactly what vdeliver
  implements, so that webmail can never save a script vdeliver cannot run (the same file
  `vmailctl dovecot-config` writes);
- `roundcube/vdeliver.inc.php`: the fragment for Debian's /etc/roundcube/config.inc.php (the
  IMAP, SMTP and ManageSieve hosts, the plugins, the filter and vacation forms, the folder-name
  encoding Pigeonhole and vdeliver expect, and an SQLite database for Roundcube's own state);
- `roundcube/plugins/vdeliver/vdeliver.php`: a small Roundcube plugin that shows a suspended user
  the reason Dovecot gives (Roundcube alone says only "Login failed.").

[webmail] keys (all optional):

    imap_host            Roundcube's IMAP server            "localhost:143"
    smtp_host            where Roundcube submits mail       "localhost:25"
    smtp_auth            log in to smtp_host as the user    false
    managesieve_address  Dovecot's ManageSieve listener     "127.0.0.1"
    managesieve_port     its port                           4190
    managesieve_tls      STARTTLS required (any address)    false
    database             Roundcube's SQLite file            "/var/lib/roundcube/db/roundcube.sqlite"
    plugins              more Roundcube plugins             []
    product_name         the name on the login page         "Webmail"

docs/webmail.md has the whole set-up.  Only the standard library; imported when the command runs.
"""

from __future__ import annotations

import ipaddress

from vdeliver.accounts.errors import ConfigurationError
from vdeliver.config import Config, ConfigError, read_table

KEYS: dict[str, tuple[object, str]] = {
    "imap_host": ("localhost:143", "str"),
    "smtp_host": ("localhost:25", "str"),
    "smtp_auth": (False, "bool"),
    "managesieve_address": ("127.0.0.1", "str"),
    "managesieve_port": (4190, "int"),
    "managesieve_tls": (False, "bool"),
    "database": ("/var/lib/roundcube/db/roundcube.sqlite", "str"),
    "plugins": ((), "strs"),
    "product_name": ("Webmail", "str"),
}

MANAGESIEVE_FILE = "dovecot/conf.d/20-vdeliver-managesieve.conf"
SIEVE_FILE = "dovecot/conf.d/90-vdeliver-sieve.conf"
ROUNDCUBE_FILE = "roundcube/vdeliver.inc.php"
PLUGIN_FILE = "roundcube/plugins/vdeliver/vdeliver.php"

# The name Roundcube gives the script it creates; any name works, this is Roundcube's default
# when the plugin's own configuration is empty (as Debian ships it).
SCRIPT_NAME = "roundcube"


class Settings:
    """The [webmail] table, checked once; every error names the file and the key."""

    def __init__(self, cfg: Config) -> None:
        self.source = cfg.path or "<defaults>"
        try:
            given = read_table(cfg, "webmail", {key: kind for key, (_default, kind) in KEYS.items()})
        except ConfigError as exc:
            raise ConfigurationError(f"{exc.where}: {exc.message}") from None
        values = {key: given.get(key, default) for key, (default, _kind) in KEYS.items()}

        def where(key: str) -> str:
            return cfg.where("webmail", key)

        for key in ("imap_host", "smtp_host", "managesieve_address", "database", "product_name"):
            text = str(values[key])
            if not text or any(ch < " " or ch == "\x7f" for ch in text) or len(text) > 200:
                raise ConfigurationError(f"{where(key)}: one line of text, at most 200 characters")
        for key in ("imap_host", "smtp_host"):
            if any(ch in str(values[key]) for ch in " '\\\""):
                raise ConfigurationError(f"{where(key)}: a host, host:port or ssl://host:port, nothing more")
        self.imap_host = str(values["imap_host"])
        self.smtp_host = str(values["smtp_host"])
        self.smtp_auth = bool(values["smtp_auth"])
        self.tls = bool(values["managesieve_tls"])
        address = str(values["managesieve_address"])
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise ConfigurationError(f"{where('managesieve_address')}: an IP address (got {address!r})") from None
        if not ip.is_loopback and not self.tls:
            raise ConfigurationError(
                f"{where('managesieve_address')}: {address} is not a loopback address: ManageSieve carries "
                "passwords, so it listens on loopback unless managesieve_tls = true")
        self.address = address
        port = int(values["managesieve_port"])  # type: ignore[call-overload]
        if not 1 <= port <= 65535:
            raise ConfigurationError(f"{where('managesieve_port')}: a port, 1 to 65535 (got {port})")
        self.port = port
        database = str(values["database"])
        if not database.startswith("/") or "?" in database or "/../" in database + "/":
            raise ConfigurationError(f"{where('database')}: an absolute path to an SQLite file")
        self.database = database
        plugins: tuple[str, ...] = values["plugins"]  # type: ignore[assignment]
        for name in plugins:
            if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
                raise ConfigurationError(f"{where('plugins')}: {name!r} is not a Roundcube plugin name")
        self.plugins = ["managesieve", "vdeliver",
                        *(p for p in dict.fromkeys(plugins) if p not in ("managesieve", "vdeliver"))]
        self.product_name = str(values["product_name"])
        try:
            from vdeliver.sieve.delivery import settings as sieve_settings

            enabled = sieve_settings(cfg).enabled
        except ConfigError as exc:
            raise ConfigurationError(f"{exc.where}: {exc.message}") from None
        if not enabled:
            raise ConfigurationError(f"{cfg.where('sieve', 'enabled')}: is false: the filters users save in "
                                     "webmail would never run (set [sieve] enabled = true)")

    @property
    def managesieve_host(self) -> str:
        """Roundcube's managesieve_host: where it reaches the listener."""
        host = self.address if ":" not in self.address else f"[{self.address}]"
        if ipaddress.ip_address(self.address).is_unspecified:
            host = "localhost"
        return f"{'tls://' if self.tls else ''}{host}:{self.port}"


def _php(text: str) -> str:
    """A PHP single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def managesieve_conf(s: Settings) -> str:
    tls = ""
    if s.tls:
        tls = ("protocol sieve {\n"
               "  # No password before STARTTLS (the certificate is Dovecot's ssl_cert / ssl_key).\n"
               "  disable_plaintext_auth = yes\n"
               "}\n")
    return (
        f"# Generated by `vmailctl webmail-config` from {s.source}.\n"
        "# ManageSieve (RFC 5804, dovecot-managesieved): webmail's filter editor saves each user's\n"
        "# scripts where vdeliver runs them (90-vdeliver-sieve.conf), and can save only what\n"
        "# vdeliver implements.\n"
        "protocols = $protocols sieve\n"
        "service managesieve-login {\n"
        "  inet_listener sieve {\n"
        f"    address = {s.address}\n"
        f"    port = {s.port}\n"
        "  }\n"
        "}\n"
        f"{tls}"
    )


def roundcube_conf(s: Settings) -> str:
    smtp_user, smtp_pass = ("%u", "%p") if s.smtp_auth else ("", "")
    plugins = ", ".join(_php(p) for p in s.plugins)
    return (
        "<?php\n"
        f"// Generated by `vmailctl webmail-config` from {s.source.replace('?>', '')}.\n"
        "// Include it at the end of /etc/roundcube/config.inc.php:\n"
        "//     include '/etc/roundcube/vdeliver.inc.php';\n"
        "// Users log in with their full address, as to Dovecot.\n"
        f"$config['product_name'] = {_php(s.product_name)};\n"
        f"$config['imap_host'] = {_php(s.imap_host)};\n"
        f"$config['smtp_host'] = {_php(s.smtp_host)};\n"
        f"$config['smtp_user'] = {_php(smtp_user)};\n"
        f"$config['smtp_pass'] = {_php(smtp_pass)};\n"
        "// Roundcube's own state (sessions, contacts, preferences): SQLite, created on first use in a\n"
        "// directory the web server's user may write.\n"
        f"$config['db_dsnw'] = {_php('sqlite:///' + s.database + '?mode=0640')};\n"
        "$config['plugins'] = array_values(array_unique(array_merge(\n"
        f"    isset($config['plugins']) ? $config['plugins'] : [], [{plugins}])));\n"
        "\n"
        "// Filters: Dovecot's ManageSieve, which keeps the scripts where vdeliver runs them.\n"
        f"$config['managesieve_host'] = {_php(s.managesieve_host)};\n"
        "$config['managesieve_auth_type'] = null;\n"
        f"$config['managesieve_script_name'] = {_php(SCRIPT_NAME)};\n"
        "$config['managesieve_default'] = '';\n"
        "// Folder names in fileinto as UTF-8 (RFC 5228).  The plugin's built-in default is modified\n"
        "// UTF-7, which neither Pigeonhole nor vdeliver would find.\n"
        "$config['managesieve_mbox_encoding'] = 'UTF-8';\n"
        "$config['managesieve_replace_delimiter'] = '';\n"
        "// The out-of-office form (Settings > Out of Office) and forwarding, beside the filters.\n"
        "$config['managesieve_vacation'] = 1;\n"
        "$config['managesieve_forward'] = 1;\n"
        "$config['managesieve_raw_editor'] = true;\n"
        "$config['managesieve_disabled_extensions'] = [];\n"
    )


def plugin_php(s: Settings) -> str:
    return (
        "<?php\n"
        f"// Generated by `vmailctl webmail-config` from {s.source.replace('?>', '')}.\n"
        "// Roundcube plugin `vdeliver`: a suspended user is told why the login was refused.\n"
        "// Dovecot refuses a suspended account with NO [CONTACTADMIN] and the stored reason, and only\n"
        "// after the password was right (a wrong one gets AUTHENTICATIONFAILED); Roundcube itself says\n"
        "// only \"Login failed.\".  Install: ln -s /etc/roundcube/plugins/vdeliver /var/lib/roundcube/plugins/\n"
        "class vdeliver extends rcube_plugin\n"
        "{\n"
        "    public $task = 'login|logout';\n"
        "\n"
        "    function init()\n"
        "    {\n"
        "        $this->add_hook('login_failed', [$this, 'login_failed']);\n"
        "    }\n"
        "\n"
        "    function login_failed($args)\n"
        "    {\n"
        "        $rcmail = rcmail::get_instance();\n"
        "        $storage = $rcmail->get_storage();\n"
        "        if ($storage && $storage->get_response_code() == rcube_storage::CONTACTADMIN) {\n"
        "            // Roundcube puts the command before the server's text: \"AUTHENTICATE PLAIN: reason\".\n"
        "            $reason = preg_replace('/^(AUTHENTICATE [A-Z0-9-]+|LOGIN): /', '',\n"
        "                                   trim((string) $storage->get_error_str()));\n"
        "            if ($reason !== '') {\n"
        "                $rcmail->output->show_message(rcube::Q(mb_substr($reason, 0, 200)), 'warning');\n"
        "            }\n"
        "        }\n"
        "        return $args;\n"
        "    }\n"
        "}\n"
    )


def render_files(cfg: Config) -> dict[str, str]:
    """Every generated file, by its path relative to /etc."""
    from vdeliver.accounts import dovecot

    s = Settings(cfg)
    sieve = dovecot.sieve_conf(dovecot.Settings(cfg, lookup_uid=False))
    return {MANAGESIEVE_FILE: managesieve_conf(s), SIEVE_FILE: sieve, ROUNDCUBE_FILE: roundcube_conf(s),
            PLUGIN_FILE: plugin_php(s)}


# -- vmailctl webmail-config ---------------------------------------------------------------


def parse_args(argv: list[str]) -> object:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vmailctl webmail-config", exit_on_error=False,
        description="Print (or write under --output DIR, which plays /etc) Dovecot's ManageSieve service and "
                    "Roundcube's configuration fragment for this vdeliver set-up (docs/webmail.md).",
        epilog=f"Files: {MANAGESIEVE_FILE}, {SIEVE_FILE}, {ROUNDCUBE_FILE}, {PLUGIN_FILE}.  With --output /etc "
               "they land where Debian's dovecot-core and roundcube-core read them; include vdeliver.inc.php from "
               "/etc/roundcube/config.inc.php and link the plugin's directory into /var/lib/roundcube/plugins.",
    )
    parser.add_argument("--output", "-o", metavar="DIR",
                        help="write the files under DIR (e.g. /etc) instead of printing them")
    parser.add_argument("--file", metavar="NAME", help=f"print only this file (e.g. {ROUNDCUBE_FILE})")
    from vdeliver.accounts.dovecot import parse_words

    return parse_words(parser, argv, "webmail-config")


def render(cfg: Config, argv: list[str] | None = None) -> str | int:
    """What `vmailctl webmail-config [ARGS]` prints."""
    from vdeliver.accounts.dovecot import deliver_files

    try:
        args = parse_args(list(argv or []))
    except SystemExit as exc:  # --help: argparse printed it
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    return deliver_files(render_files(cfg), getattr(args, "file", None), getattr(args, "output", None))
