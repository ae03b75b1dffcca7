#!/usr/bin/env bash
# Installs the real mail peers the mail tests and the SMTP benchmark use, when missing:
# Postfix (relay, smtp-sink, smtp-source), swaks with its TLS modules (SMTP client),
# Dovecot (IMAP server), openssl (test certificates); with --bench also Python's aiosmtpd.
# Non-interactive; runs `apt-get update` once. Services are not started: tests start what
# they need by hand, with their own config in a temporary directory, on loopback ports.
set -euo pipefail

need=()
command -v postfix >/dev/null 2>&1 || need+=(postfix)
command -v smtp-sink >/dev/null 2>&1 || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
[ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# swaks needs these for STARTTLS (they are only recommended by the package).
perl -MNet::SSLeay -e1 >/dev/null 2>&1 || need+=(libnet-ssleay-perl)
perl -MIO::Socket::SSL -e1 >/dev/null 2>&1 || need+=(libio-socket-ssl-perl)

if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "postfix postfix/main_mailer_type select Local only" | $SUDO debconf-set-selections
  echo "postfix postfix/mailname string ketenbus.test" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
  # The packages start nothing we rely on; stop what their scripts may have started.
  $SUDO postfix stop >/dev/null 2>&1 || true
  $SUDO doveadm stop >/dev/null 2>&1 || true
fi

if [ "${1:-}" = "--bench" ]; then
  python3 -c "import aiosmtpd" 2>/dev/null || python3 -m pip install -q "aiosmtpd==1.4.6"
fi
echo "mail peers ready: $(postconf -h mail_version 2>/dev/null | sed 's/^/postfix /'), swaks, dovecot $(dovecot --version 2>/dev/null | cut -d' ' -f1)"
