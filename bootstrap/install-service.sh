#!/usr/bin/env bash
# Install one MIaaS service on this machine as a systemd unit.
#   usage: sudo bootstrap/install-service.sh <service> [env-file]
#   service: service-registry | model-registry | controller | agent | frontend
# The env file (default /etc/miaas/miaas.env, mode 0600) holds the settings listed in .env.example.
set -euo pipefail

usage() { echo "usage: $0 <service-registry|model-registry|controller|agent|frontend> [env-file]" >&2; exit 2; }
[ $# -ge 1 ] || usage
service=$1
env_file=${2:-/etc/miaas/miaas.env}
case "$service" in
  service-registry) module=service_registry ;;
  model-registry)   module=model_registry ;;
  controller)       module=controller ;;
  agent)            module=agent ;;
  frontend)         module=frontend ;;
  *) usage ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (it writes /opt/miaas and a systemd unit)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "error: python3 is missing: apt-get install -y python3 python3-venv" >&2; exit 1; }
python3 -c 'import venv, ensurepip' 2>/dev/null || { echo "error: python3-venv is missing: apt-get install -y python3-venv" >&2; exit 1; }
[ -f "$env_file" ] || { echo "error: $env_file not found; copy .env.example there and fill it in" >&2; exit 1; }
if grep -qE '^(FRONTEND_SECRET_KEY|FRONTEND_ADMIN_PASSWORD)=(|change-me.*)$' "$env_file"; then
  echo "error: $env_file still has an empty or placeholder secret" >&2; exit 1
fi
ca_file=$(sed -n 's/^MIAAS_CA_FILE=//p' "$env_file" | tail -n1)
[ -n "$ca_file" ] && [ -f "$ca_file" ] || {
  echo "error: MIAAS_CA_FILE in $env_file must name the cluster CA's public key (ca.json from make up or the installer)" >&2
  exit 1
}
chmod 600 "$env_file"

# A restarted agent finds its VMs again: their port forwarders (ssh processes vagrant-libvirt started) must outlive
# it, so systemd stops only the agent's main process. Other services take their whole group down with them.
kill_mode=mixed
[ "$service" = agent ] && kill_mode=process

src=$(cd "$(dirname "$0")/.." && pwd)
id miaas >/dev/null 2>&1 || useradd --system --home /var/lib/miaas --create-home --shell /usr/sbin/nologin miaas
install -d -o miaas -g miaas -m 0750 /var/lib/miaas
[ -x /opt/miaas/venv/bin/python ] || python3 -m venv /opt/miaas/venv
/opt/miaas/venv/bin/pip install --quiet --upgrade pip
/opt/miaas/venv/bin/pip install --quiet "$src"

unit=/etc/systemd/system/miaas-$service.service
cat > "$unit" <<UNIT
[Unit]
Description=MIaaS $service
After=network-online.target
Wants=network-online.target

[Service]
User=miaas
Group=miaas
WorkingDirectory=/var/lib/miaas
EnvironmentFile=$env_file
ExecStart=/opt/miaas/venv/bin/python -m $module
Restart=on-failure
RestartSec=2
KillMode=$kill_mode
TimeoutStopSec=30
NoNewPrivileges=true

[Install]
WantedBy=multi-user.target
UNIT
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now "miaas-$service.service"
  echo "miaas-$service is running: systemctl status miaas-$service"
else
  echo "wrote $unit; this machine does not run systemd, start it with:"
  echo "  sudo -u miaas env \$(grep -v '^#' $env_file | xargs) /opt/miaas/venv/bin/python -m $module"
fi
