#!/bin/sh
# Switches the running gatehouse.service to the gatehouse binary now installed, without refusing
# a connection: run it after the package manager (or `install`) replaced /usr/bin/gatehouse.
#
#   contrib/gatehouse-upgrade.sh [UNIT]        UNIT defaults to gatehouse.service
#
# It checks the config with the new binary, sends SIGUSR2 to the service's main process (which
# starts the new binary with --takeover in the service's cgroup; see contrib/gatehouse.service),
# and waits until systemd names the new process the main one. The old process then finishes its
# requests and exits by itself. Exit 0: upgraded. Exit 1: nothing changed, the old process still
# serves; the reason is in `journalctl -u UNIT`.
set -eu

unit=${1:-gatehouse.service}
bin=${GATEHOUSE_BIN:-/usr/bin/gatehouse}
config=${GATEHOUSE_CONFIG:-/etc/gatehouse/gatehouse.toml}
wait_s=${GATEHOUSE_UPGRADE_WAIT:-150}

# A config the new binary rejects would make its takeover fail (harmlessly); say so up front.
"$bin" check -c "$config"

old=$(systemctl show -P MainPID "$unit")
if [ -z "$old" ] || [ "$old" -eq 0 ]; then
  echo "$unit is not running; start it with: systemctl start $unit" >&2
  exit 1
fi
kill -USR2 "$old"

i=0
while [ "$i" -lt "$wait_s" ]; do
  sleep 1
  i=$((i + 1))
  new=$(systemctl show -P MainPID "$unit")
  if [ -n "$new" ] && [ "$new" -ne 0 ] && [ "$new" -ne "$old" ]; then
    echo "$unit: pid $new took over from pid $old, which now drains and exits"
    exit 0
  fi
  if ! kill -0 "$old" 2>/dev/null; then
    echo "$unit: pid $old exited, but no new main process was named; see journalctl -u $unit" >&2
    exit 1
  fi
  # The new process gave up (it logs why, and the old one that it keeps serving).
  if journalctl -u "$unit" --since "-${i}s" -o cat 2>/dev/null |
    grep -q "this process keeps serving"; then
    echo "$unit: the new binary could not take over; pid $old keeps serving." >&2
    echo "See: journalctl -u $unit --since -${i}s" >&2
    exit 1
  fi
done
echo "$unit: no takeover within ${wait_s}s; pid $old keeps serving; see journalctl -u $unit" >&2
exit 1
